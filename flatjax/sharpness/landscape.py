"""1-D and 2-D loss landscapes along filter-normalised random directions (Li et al. 2018).

``L(w + α d₁)`` on a line and ``L(w + α d₁ + β d₂)`` on a grid, with ``d₁, d₂`` random Gaussian
directions filter-normalised against ``w`` (see :mod:`flatjax.sharpness.directions`: filters on the
last axis of Flax kernels, zero direction for 1-D leaves by default). The grid is evaluated in
vectorised chunks (``vmap`` over ``chunk_size`` points per compiled call); the last chunk is padded
so one compilation serves the whole grid. With several ``batches`` each point is the weighted mean
over batches (see :class:`flatjax.sharpness.HessianOperator`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.validate import check_key, check_positive_int, invalid
from .common import Batch, progress
from .directions import filter_normalized_direction
from .hvp import HessianOperator, LossFn, Params, as_operator, to_numpy


class Landscape1D(NamedTuple):
    """Result of :func:`loss_landscape_1d`: ``losses[i] = L(w + alphas[i] d)``."""

    alphas: np.ndarray
    losses: np.ndarray
    center_loss: float
    direction: Params

    def summary(self) -> dict[str, float]:
        """Centre, minimum, maximum and mean loss, and the largest increase over the centre."""
        return _summary(self.losses, self.center_loss)


class Landscape2D(NamedTuple):
    """Result of :func:`loss_landscape_2d`: ``losses[i, j] = L(w + alphas[i] d₁ + betas[j] d₂)``."""

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    center_loss: float
    directions: tuple[Params, Params]

    def summary(self) -> dict[str, float]:
        """Centre, minimum, maximum and mean loss, and the largest increase over the centre."""
        return _summary(self.losses, self.center_loss)


def _summary(losses: np.ndarray, center: float) -> dict[str, float]:
    finite = losses[np.isfinite(losses)]
    return {
        "center_loss": float(center),
        "min_loss": float(finite.min()) if finite.size else float("nan"),
        "max_loss": float(finite.max()) if finite.size else float("nan"),
        "mean_loss": float(finite.mean()) if finite.size else float("nan"),
        "max_increase": float(finite.max() - center) if finite.size else float("nan"),
        "num_points": int(losses.size),
        "num_nonfinite": int(losses.size - finite.size),
    }


def _coords(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)):
        raise invalid(name, "a non-empty 1-D sequence of finite numbers", values)
    return arr


def _evaluate(op: HessianOperator, dirs: jax.Array, coeffs: np.ndarray, chunk_size: int | None,
              progress_bar: bool, desc: str) -> np.ndarray:
    n = coeffs.shape[0]
    if chunk_size is None:
        chunk_size = max(1, min(64, (1 << 24) // max(op.dim, 1)))
    chunk_size = min(check_positive_int("chunk_size", chunk_size), n)
    out = np.empty(n)
    starts = range(0, n, chunk_size)
    for s in progress(starts, progress_bar, desc, len(starts)):
        c = coeffs[s:s + chunk_size]
        pad = chunk_size - c.shape[0]
        if pad:
            c = np.concatenate([c, np.zeros((pad, c.shape[1]))])
        vals = to_numpy(op.loss_grid(dirs, jnp.asarray(c, op.dtype)))
        out[s:s + chunk_size - pad] = vals[:chunk_size - pad]
    return out


def _direction(op: HessianOperator, d: Params | None, key: jax.Array | None, one_d: str,
               name: str) -> tuple[Params, jax.Array]:
    if d is None:
        if key is None:
            raise invalid("key", f"a jax.random key when {name} is not given", key)
        d = filter_normalized_direction(key, op.params, one_d=one_d)
    if jax.tree.structure(d) != jax.tree.structure(op.params):
        raise invalid(name, "a pytree with the structure of params", jax.tree.structure(d))
    flat = op.ravel(d)
    if flat.shape != (op.dim,):
        raise invalid(name, "a pytree with the shapes of params", flat.shape)
    return d, flat


def loss_landscape_1d(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    key: jax.Array | None = None,
    direction: Params | None = None,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    alphas: Sequence[float] | np.ndarray | None = None,
    one_d: str = "zero",
    chunk_size: int | None = None,
    progress_bar: bool = False,
) -> Landscape1D:
    """Loss along one filter-normalised random direction, ``L(w + α d)`` (Li et al. 2018).

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      key: random key for the direction (required unless ``direction`` is given).
      direction: a pytree direction to use as is (e.g. an eigenvector or a filter-normalised
        direction made earlier); overrides ``key``.
      alphas: step sizes; default 51 points in ``[-1, 1]``.
      one_d: treatment of 1-D leaves in the random direction: ``"zero"`` (default) or ``"filter"``.
      chunk_size: grid points per vectorised call (default: up to 64, fewer for large models).
      progress_bar: show a tqdm bar.
    """
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    key = None if key is None else check_key(key)
    alphas = _coords("alphas", np.linspace(-1.0, 1.0, 51) if alphas is None else alphas)
    d, flat = _direction(op, direction, key, one_d, "direction")
    losses = _evaluate(op, flat[None], alphas[:, None], chunk_size, progress_bar, "landscape 1D")
    return Landscape1D(alphas, losses, op.loss(), d)


def loss_landscape_2d(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    key: jax.Array | None = None,
    directions: tuple[Params, Params] | None = None,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    alphas: Sequence[float] | np.ndarray | None = None,
    betas: Sequence[float] | np.ndarray | None = None,
    one_d: str = "zero",
    chunk_size: int | None = None,
    progress_bar: bool = False,
) -> Landscape2D:
    """Loss on a 2-D plane of filter-normalised random directions (Li et al. 2018).

    ``losses[i, j] = L(w + alphas[i] d₁ + betas[j] d₂)``; the papers use ``[-1, 1]²`` with 50×50
    points (default here: 51×51, so the centre is on the grid). Two independent random
    directions in high dimension are nearly orthogonal, so no orthogonalisation is done.

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      key: random key for the two directions (required unless ``directions`` is given).
      directions: ``(d₁, d₂)`` pytrees to use as is; overrides ``key``.
      alphas, betas: grid coordinates; default 51 points in ``[-1, 1]`` each.
      one_d: treatment of 1-D leaves in random directions: ``"zero"`` (default) or ``"filter"``.
      chunk_size: grid points per vectorised call (default: up to 64, fewer for large models).
      progress_bar: show a tqdm bar.
    """
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    alphas = _coords("alphas", np.linspace(-1.0, 1.0, 51) if alphas is None else alphas)
    betas = _coords("betas", np.linspace(-1.0, 1.0, 51) if betas is None else betas)
    if directions is None:
        if key is None:
            raise invalid("key", "a jax.random key when directions is not given", key)
        k1, k2 = jax.random.split(check_key(key))
        d1, f1 = _direction(op, None, k1, one_d, "directions[0]")
        d2, f2 = _direction(op, None, k2, one_d, "directions[1]")
    else:
        if not isinstance(directions, (tuple, list)) or len(directions) != 2:
            raise invalid("directions", "a pair (d1, d2) of pytrees shaped like params",
                       type(directions).__name__)
        d1, f1 = _direction(op, directions[0], None, one_d, "directions[0]")
        d2, f2 = _direction(op, directions[1], None, one_d, "directions[1]")
    aa, bb = np.meshgrid(alphas, betas, indexing="ij")
    coeffs = np.stack([aa.ravel(), bb.ravel()], axis=1)
    losses = _evaluate(op, jnp.stack([f1, f2]), coeffs, chunk_size, progress_bar, "landscape 2D")
    return Landscape2D(alphas, betas, losses.reshape(aa.shape), op.loss(), (d1, d2))
