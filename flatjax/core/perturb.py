"""Perturbation rules shared by the methods: where the probe points around ``w`` are.

Flax convention: a "filter" is one output unit, the LAST axis of a kernel with ``ndim > 1`` (Conv
``(H, W, in, out)``, Dense ``(in, out)``); its norm reduces over every other (fan-in) axis. PyTorch code
(the papers') keeps the output axis first. Leaves with ``ndim <= 1`` (biases, norm scales/offsets,
scalars) are one filter as a whole for the noise scale, as in the official RWP/ARWP code; ARWP's
history is summed per filter for kernels but taken per element for such leaves. The rules in full:
``docs/algorithms.md``.

Public building blocks for new methods: :func:`normalized_ascent` (SAM), :func:`adaptive_ascent` and
:func:`default_adaptive_mask` (ASAM), :func:`filterwise_gaussian` and :func:`accumulate_squares`
(RWP/ARWP), :func:`isotropic_noise` and :func:`unit_noise` (NSO/WP-SGD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flatjax.core.tree import XI, PyTree, global_norm, promoted, up

#: ASAM's "weight" parameters in Flax naming (torch: names containing "weight").
ADAPTIVE_LEAF_NAMES = ("kernel", "scale", "embedding", "weight", "w")

NOISE_DISTRIBUTIONS = ("gaussian", "laplace", "uniform")


def _fan_in_axes(leaf: jax.Array) -> tuple[int, ...]:
    return tuple(range(leaf.ndim - 1))


def filter_norms(leaf: jax.Array) -> jax.Array:
    """Per-filter L2 norm broadcastable to ``leaf``: over fan-in axes for ``ndim > 1``, whole leaf else."""
    x = up(leaf)
    if leaf.ndim > 1:
        return jnp.sqrt(jnp.sum(x * x, axis=_fan_in_axes(leaf), keepdims=True))
    return jnp.sqrt(jnp.sum(x * x)) + 1e-16


def filter_sums(leaf: jax.Array) -> jax.Array:
    """ARWP's per-filter SUM of accumulated squared gradients (``ndim <= 1``: per element)."""
    if leaf.ndim > 1:
        return jnp.sum(leaf, axis=_fan_in_axes(leaf), keepdims=True)
    return leaf


def leaf_keys(key: jax.Array, tree: PyTree) -> PyTree:
    """One independent key per leaf of ``tree`` (same structure)."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, max(len(leaves), 1))[: len(leaves)]))


def unit_noise(key: jax.Array, tree: PyTree, distribution: str = "gaussian") -> PyTree:
    """Zero-mean, unit-variance i.i.d. noise shaped like ``tree``, in each leaf's promoted dtype.

    ``gaussian``: N(0, 1); ``laplace``: Laplace(0, 1/√2); ``uniform``: U(−√3, √3) — the NSO code's options.
    """

    def draw(k, leaf):
        shape, dtype = jnp.shape(leaf), promoted(jnp.result_type(leaf))
        if distribution == "gaussian":
            return jax.random.normal(k, shape, dtype)
        if distribution == "laplace":
            return jax.random.laplace(k, shape, dtype) / jnp.sqrt(jnp.asarray(2.0, dtype))
        if distribution == "uniform":
            bound = jnp.sqrt(jnp.asarray(3.0, dtype))
            return jax.random.uniform(k, shape, dtype, -bound, bound)
        raise ValueError(f"distribution must be one of {NOISE_DISTRIBUTIONS}, got {distribution!r}")

    return jax.tree.map(draw, leaf_keys(key, tree), tree)


def normalized_ascent(grad: PyTree, rho: jax.Array) -> PyTree:
    """SAM's ascent step ``e = ρ g / (‖g‖ + ξ)`` (Foret et al., ICLR 2021). Zero gradient → zero step."""
    factor = rho / (global_norm(grad) + XI)
    return jax.tree.map(lambda g: (factor * up(g)).astype(g.dtype), grad)


def default_adaptive_mask(params: PyTree) -> PyTree:
    """ASAM's default mask: True for kernels/norm scales/embeddings (by leaf name), or any ``ndim > 1``."""

    def is_adaptive(path, leaf):
        last = path[-1] if path else None
        name = getattr(last, "key", getattr(last, "name", None))
        return bool(jnp.ndim(leaf) > 1 or (isinstance(name, str) and name in ADAPTIVE_LEAF_NAMES))

    return jax.tree_util.tree_map_with_path(is_adaptive, params)


def adaptive_ascent(
    grad: PyTree, params: PyTree, rho: jax.Array, eta: jax.Array, mask: PyTree
) -> PyTree:
    """ASAM's ascent ``e = ρ T² g / (‖T g‖ + ξ)``, ``T = |w| + η`` where ``mask`` is True, else 1.

    Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021.
    """

    def t_of(w, m):
        return jnp.where(m, jnp.abs(up(w)) + eta, 1.0)

    scales = jax.tree.map(t_of, params, mask)
    tg = jax.tree.map(lambda t, g: t * up(g), scales, grad)
    factor = rho / (global_norm(tg) + XI)
    return jax.tree.map(lambda t, x, g: (factor * t * x).astype(g.dtype), scales, tg, grad)


def filterwise_gaussian(
    key: jax.Array,
    params: PyTree,
    sigma: jax.Array,
    accumulator: PyTree | None = None,
    eta: jax.Array | float = 0.0,
) -> PyTree:
    """Filter-wise Gaussian noise of RWP/ARWP (Li et al., TMLR 2024; after LPF-SGD).

    ``e_f = σ ‖w_f‖ z / sqrt(1 + η F_f)``, z ~ N(0, I), with ``F_f`` the per-filter sum of the ARWP
    accumulator (omit it, or η = 0, for plain RWP). Returned in each leaf's dtype.
    """
    z = unit_noise(key, params)
    if accumulator is None:
        scaled = jax.tree.map(lambda w, n: sigma * filter_norms(w) * n, params, z)
    else:
        scaled = jax.tree.map(
            lambda w, n, s: sigma * filter_norms(w) * n / jnp.sqrt(1.0 + eta * filter_sums(s)),
            params,
            z,
            accumulator,
        )
    return jax.tree.map(lambda e, w: e.astype(w.dtype), scaled, params)


def isotropic_noise(
    key: jax.Array, params: PyTree, sigma: jax.Array, distribution: str = "gaussian"
) -> PyTree:
    """Absolute-scale noise ``U = σ z`` on every leaf (NSO / WP-SGD; Zhang et al., TMLR 2024)."""
    z = unit_noise(key, params, distribution)
    return jax.tree.map(lambda n, w: (sigma * n).astype(w.dtype), z, params)


def accumulate_squares(accumulator: PyTree, grad: PyTree, beta: jax.Array) -> PyTree:
    """ARWP's history ``s ← β s + g²`` (no (1−β) factor, as in the official code)."""
    return jax.tree.map(
        lambda s, g: (beta * s + jnp.square(up(g))).astype(s.dtype), accumulator, grad
    )


