"""Small models, batches and plain-NumPy helpers for the optimizer tests (no flatjax internals)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mlp_params(seed: int = 0, sizes=(5, 7, 3)) -> dict:
    rng = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"dense{i}"] = {
            "kernel": jnp.asarray(rng.normal(size=(a, b)) / np.sqrt(a), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(b,)) * 0.1, jnp.float32),
        }
    return params


def mlp_loss(params: dict, batch: dict) -> jax.Array:
    """Softmax cross-entropy of a tanh MLP."""
    h = batch["x"]
    n = len(params)
    for i in range(n):
        layer = params[f"dense{i}"]
        h = h @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            h = jnp.tanh(h)
    logp = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(logp, batch["y"][:, None], axis=1))


def make_batch(seed: int = 1, n: int = 8, d: int = 5, classes: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x": jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
        "y": jnp.asarray(rng.integers(0, classes, size=(n,)), jnp.int32),
    }


grad_fn = jax.jit(jax.grad(mlp_loss))


def np_grad(params, batch) -> dict:
    return jax.tree.map(np.asarray, grad_fn(jax.tree.map(jnp.asarray, params), batch))


def np_tree(tree) -> dict:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def np_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


def tmap(f, *trees):
    return jax.tree.map(f, *trees)


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
    ja, jb = jax.tree.structure(a), jax.tree.structure(b)
    assert ja == jb, (ja, jb)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(np.asarray(x).dtype, np.integer) or np.asarray(x).dtype == bool:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
            continue
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol)


def fixed_noise(params, seed: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    return tmap(lambda p: rng.normal(size=np.shape(p)).astype(np.float32), params)


def np_filter_norm(p: np.ndarray) -> np.ndarray:
    """Per-output-filter norm (last axis) for ndim > 1; whole-vector norm + 1e-16 for 1-D."""
    if p.ndim > 1:
        return np.sqrt(np.sum(p * p, axis=tuple(range(p.ndim - 1)), keepdims=True))
    return np.sqrt(np.sum(p * p)) + 1e-16


def np_filter_sum(s: np.ndarray) -> np.ndarray:
    if s.ndim > 1:
        return np.sum(s, axis=tuple(range(s.ndim - 1)), keepdims=True)
    return s
