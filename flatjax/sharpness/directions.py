"""Random directions and perturbations in parameter space, per output filter.

Flax stores kernels with the output units on the **last** axis: ``Dense`` ``(in, out)``, ``Conv``
``(kh, kw, in, out)``. A *filter* is one output unit, ``w[..., f]``; its norm reduces over every
other (fan-in) axis. PyTorch code (the papers') keeps outputs on axis 0 — do not mix the two.
Leaves with ``ndim <= 1`` (biases, normalisation scales and offsets, scalars) are "1-D leaves".

* :func:`filter_normalize` / :func:`filter_normalized_direction`: Li, Xu, Taylor, Studer &
  Goldstein (2018), "Visualizing the loss landscape of neural nets": scale each filter of a random
  Gaussian direction to the norm of the corresponding weight filter, ``d_f <- d_f ||w_f|| / ||d_f||``,
  so that landscapes of networks with different weight scales are comparable. 1-D leaves get a zero
  direction by default (``one_d="zero"``, as Li et al. recommend for biases and BatchNorm), or are
  treated as one filter (``one_d="filter"``).
* :func:`filter_wise_noise`: the Gaussian weight noise of RWP (Li et al., TMLR 2024, after
  LPF-SGD): ``e_f = σ ||w_f|| z`` per filter, and ``σ (||p|| + 1e-16) z`` for a whole 1-D leaf.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from flatjax.core.perturb import filter_norms as _filter_norms
from flatjax.core.perturb import filterwise_gaussian

from ..core.validate import check_choice, check_key, check_nonnegative, invalid

Params = Any
ONE_D_MODES = ("zero", "filter")


@functools.partial(jax.jit, static_argnames=("one_d", "eps"))
def _filter_normalize(direction: Params, params: Params, one_d: str, eps: float) -> Params:
    def one(d, w):
        if w.ndim <= 1:
            if one_d == "zero":
                return jnp.zeros_like(d)
            return d * (jnp.linalg.norm(w) / (jnp.linalg.norm(d) + eps))
        return d * (_filter_norms(w) / (_filter_norms(d) + eps))

    return jax.tree.map(one, direction, params)


def _gaussian_like(key: jax.Array, params: Params) -> Params:
    """Standard normal pytree shaped like ``params``: one draw of length d, split into leaves."""
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


@functools.partial(jax.jit, static_argnames=("one_d",))
def _random_direction(key: jax.Array, params: Params, one_d: str) -> Params:
    return _filter_normalize(_gaussian_like(key, params), params, one_d, 1e-10)


# the same generator the RWP-family optimizers use (one noise definition in the library)
_filter_noise = jax.jit(filterwise_gaussian)


def _as_arrays(tree: Params, name: str) -> Params:
    leaves = jax.tree.leaves(tree)
    if not leaves or not all(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) for x in leaves):
        raise invalid(name, "a non-empty pytree of floating-point arrays", type(tree).__name__)
    return jax.tree.map(jnp.asarray, tree)


def filter_normalize(direction: Params, params: Params, *, one_d: str = "zero",
                     eps: float = 1e-10) -> Params:
    """Filter-normalise ``direction`` against ``params`` (Li et al. 2018).

    For each leaf with ``ndim > 1``: ``d[..., f] <- d[..., f] · ||w[..., f]|| / (||d[..., f]|| + eps)``
    with norms over all axes but the last. For 1-D leaves (and scalars): ``one_d="zero"`` (default)
    sets the direction to zero; ``one_d="filter"`` normalises the whole leaf as one filter
    (``d <- d ||w|| / (||d|| + eps)``). Compiled once per parameter structure.

    Args:
      direction: pytree with the structure and shapes of ``params``.
      params: the weights ``w``.
      one_d: ``"zero"`` or ``"filter"``.
      eps: guard in the denominator (> 0).
    """
    check_choice("one_d", one_d, ONE_D_MODES)
    eps = check_nonnegative("eps", eps, positive=True)
    params = _as_arrays(params, "params")
    direction = _as_arrays(direction, "direction")
    if jax.tree.structure(direction) != jax.tree.structure(params):
        raise invalid("direction", f"a pytree with the structure of params ({jax.tree.structure(params)})",
                      jax.tree.structure(direction))
    for d, w in zip(jax.tree.leaves(direction), jax.tree.leaves(params)):
        if d.shape != w.shape:
            raise invalid("direction", f"a pytree with the leaf shapes of params ({w.shape})", d.shape)
    return _filter_normalize(direction, params, one_d, eps)


def filter_normalized_direction(key: jax.Array, params: Params, *, one_d: str = "zero") -> Params:
    """A random Gaussian direction, filter-normalised against ``params`` (Li et al. 2018).

    Same key, same direction. See :func:`filter_normalize` for ``one_d``.
    """
    key = check_key(key)
    check_choice("one_d", one_d, ONE_D_MODES)
    return _random_direction(key, _as_arrays(params, "params"), one_d)


def filter_wise_noise(key: jax.Array, params: Params, sigma: float) -> Params:
    """RWP's filter-wise Gaussian weight noise (Li et al., TMLR 2024).

    ``e[..., f] = σ ||w[..., f]|| z`` for leaves with ``ndim > 1`` (filters on the last axis), and
    ``e = σ (||w|| + 1e-16) z`` for 1-D leaves and scalars, ``z ~ N(0, I)``. Same key, same noise.
    Compiled once per parameter structure.
    """
    key = check_key(key)
    sigma = check_nonnegative("sigma", sigma)
    return _filter_noise(key, _as_arrays(params, "params"), jnp.float32(sigma))
