"""Perturbation rules shared by the methods: where the probe points around ``w`` are.

Flax convention: a "filter" is one output unit, the LAST axis of a kernel with ``ndim > 1`` (Conv
``(H, W, in, out)``, Dense ``(in, out)``); its norm reduces over every other (fan-in) axis. PyTorch code
(the papers') keeps the output axis first. Leaves with ``ndim <= 1`` (biases, norm scales/offsets,
scalars) are one filter as a whole for the noise scale, as in the official RWP/ARWP code; ARWP's
history is summed per filter for kernels but taken per element for such leaves. The rules in full:
``docs/algorithms.md``.

Public building blocks for new methods: :func:`normalized_ascent` (SAM), :func:`adaptive_ascent` and
:func:`default_adaptive_mask` (ASAM), :func:`filterwise_gaussian`, :func:`filterwise_scales` and
:func:`accumulate_squares` (RWP/ARWP), :func:`isotropic_noise` and :func:`unit_noise` (NSO/WP-SGD),
:func:`scaled_noise` (any noise with its norm).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


#: Noise is drawn in chunks of this many numbers, one traced draw in a ``lax.map`` over the chunks.
NOISE_CHUNK = 1 << 16


def _draw(key: jax.Array, n: int, dtype: Any, distribution: str) -> jax.Array:
    """``n`` zero-mean, unit-variance i.i.d. numbers."""
    if distribution == "gaussian":
        return jax.random.normal(key, (n,), dtype)
    if distribution == "laplace":
        return jax.random.laplace(key, (n,), dtype) / jnp.sqrt(jnp.asarray(2.0, dtype))
    if distribution == "uniform":
        bound = jnp.sqrt(jnp.asarray(3.0, dtype))
        return jax.random.uniform(key, (n,), dtype, -bound, bound)
    raise ValueError(f"distribution must be one of {NOISE_DISTRIBUTIONS}, got {distribution!r}")


def unit_noise(key: jax.Array, tree: PyTree, distribution: str = "gaussian") -> PyTree:
    """Zero-mean, unit-variance i.i.d. noise shaped like ``tree``, in each leaf's promoted dtype.

    ``gaussian``: N(0, 1); ``laplace``: Laplace(0, 1/√2); ``uniform``: U(−√3, √3) — the NSO code's options.

    All leaves of one dtype share one stream: chunks of :data:`NOISE_CHUNK` numbers, chunk ``i`` drawn with
    ``split(fold_in(key, group), n_chunks)[i]`` inside a ``lax.map``, laid out over the leaves in tree order.
    One traced draw whatever the number of leaves: a draw per leaf made the RWP-family steps of ResNet-18
    compile ~4x longer than SAM's (each threefry draw is its own block of code), and a single draw over all
    parameters costs XLA:CPU ~30x the FLOPs of chunks.
    """
    if distribution not in NOISE_DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {NOISE_DISTRIBUTIONS}, got {distribution!r}")
    leaves, treedef = jax.tree.flatten(tree)
    dtypes = [promoted(jnp.result_type(leaf)) for leaf in leaves]
    out: list[Any] = [None] * len(leaves)
    for group, dtype in enumerate(sorted(set(dtypes), key=str)):
        members = [i for i, d in enumerate(dtypes) if d == dtype]
        sizes = [int(np.prod(jnp.shape(leaves[i]))) for i in members]
        total = sum(sizes)
        chunk = min(NOISE_CHUNK, max(total, 1))
        keys = jax.random.split(jax.random.fold_in(key, group), -(-total // chunk))
        flat = jax.lax.map(lambda k: _draw(k, chunk, dtype, distribution), keys).reshape(-1)
        offset = 0
        for i, size in zip(members, sizes):
            out[i] = flat[offset:offset + size].reshape(jnp.shape(leaves[i]))
            offset += size
    return jax.tree.unflatten(treedef, out)


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


def scaled_noise(
    key: jax.Array, tree: PyTree, scales: PyTree, distribution: str = "gaussian"
) -> tuple[PyTree, jax.Array]:
    """``(e, ‖e‖)``: ``e = scales · z`` leaf by leaf, with ``z = unit_noise(key, tree, distribution)`` (the same
    numbers), in each leaf's promoted dtype, and the global L2 norm of ``e``.

    ``scales``: a pytree like ``tree`` whose leaves broadcast to its leaves (a scalar, or per-filter values
    as from :func:`filterwise_scales`). ``e`` is built over the flat noise: its norm is one reduction, not
    one per leaf (on ResNet-18 the 62 per-leaf norms were about 40% of the noise code's compile time).
    """
    z = unit_noise(key, tree, distribution)
    leaves, treedef = jax.tree.flatten(z)
    scale_leaves = treedef.flatten_up_to(scales)
    out: list[Any] = [None] * len(leaves)
    squares = []
    for dtype in sorted({leaf.dtype for leaf in leaves}, key=str):
        members = [i for i, leaf in enumerate(leaves) if leaf.dtype == dtype]
        scale = jnp.concatenate([jnp.broadcast_to(jnp.asarray(scale_leaves[i], dtype), leaves[i].shape).reshape(-1)
                                 for i in members])
        flat = scale * jnp.concatenate([leaves[i].reshape(-1) for i in members])
        squares.append(jnp.sum(jnp.square(flat)))
        offset = 0
        for i in members:
            out[i] = flat[offset:offset + leaves[i].size].reshape(leaves[i].shape)
            offset += leaves[i].size
    norm = jnp.sqrt(sum(squares)) if squares else jnp.zeros((), jnp.float32)
    return jax.tree.unflatten(treedef, out), norm


def filterwise_scales(
    params: PyTree,
    sigma: jax.Array,
    accumulator: PyTree | None = None,
    eta: jax.Array | float = 0.0,
) -> PyTree:
    """RWP/ARWP's noise scale per filter, ``σ ‖w_f‖ / sqrt(1 + η F_f)`` (broadcastable to each leaf), with
    ``F_f`` the per-filter sum of the ARWP accumulator (omit it, or η = 0, for plain RWP)."""
    if accumulator is None:
        return jax.tree.map(lambda w: sigma * filter_norms(w), params)
    return jax.tree.map(lambda w, s: sigma * filter_norms(w) / jnp.sqrt(1.0 + eta * filter_sums(s)),
                        params, accumulator)


def filterwise_gaussian(
    key: jax.Array,
    params: PyTree,
    sigma: jax.Array,
    accumulator: PyTree | None = None,
    eta: jax.Array | float = 0.0,
) -> PyTree:
    """Filter-wise Gaussian noise of RWP/ARWP (Li et al., TMLR 2024; after LPF-SGD).

    ``e_f = σ ‖w_f‖ z / sqrt(1 + η F_f)``, z ~ N(0, I), with ``F_f`` the per-filter sum of the ARWP
    accumulator (omit it, or η = 0, for plain RWP). Returned in each leaf's dtype. For the noise and its
    norm together: ``scaled_noise(key, params, filterwise_scales(params, sigma, accumulator, eta))``.
    """
    e, _ = scaled_noise(key, params, filterwise_scales(params, sigma, accumulator, eta))
    return jax.tree.map(lambda x, w: x.astype(w.dtype), e, params)


def isotropic_noise(
    key: jax.Array, params: PyTree, sigma: jax.Array, distribution: str = "gaussian"
) -> PyTree:
    """Absolute-scale noise ``U = σ z`` on every leaf (NSO / WP-SGD; Zhang et al., TMLR 2024). For the noise
    and its norm together: ``scaled_noise(key, params, jax.tree.map(lambda _: sigma, params), distribution)``."""
    u, _ = scaled_noise(key, params, jax.tree.map(lambda _: sigma, params), distribution)
    return jax.tree.map(lambda x, w: x.astype(w.dtype), u, params)


def accumulate_squares(accumulator: PyTree, grad: PyTree, beta: jax.Array) -> PyTree:
    """ARWP's history ``s ← β s + g²`` (no (1−β) factor, as in the official code)."""
    return jax.tree.map(
        lambda s, g: (beta * s + jnp.square(up(g))).astype(s.dtype), accumulator, grad
    )


