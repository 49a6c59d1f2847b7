"""Hessian-vector products of a loss over parameter pytrees, averaged over batches.

The Hessian-vector product uses forward-over-reverse differentiation,
``H v = jvp(grad(L), (w,), (v,))`` (Pearlmutter 1994), which costs a small constant multiple of one
gradient (about 2-3x, see ``experiments/results/bench_sharpness.md``) and never forms ``H``.

**Data.** Every function in :mod:`flatjax.sharpness` takes either one ``batch`` or an iterable of
``batches``. With several batches the loss, the gradient and the HVP are averaged over them with
the weights chosen by ``weighting`` (default ``"size"``: proportional to each batch's leading-axis
length, i.e. the mean over all examples when ``loss_fn`` returns a per-batch mean; ``"equal"``:
same weight per batch; or explicit numbers). The curvature measured is therefore that of the
dataset loss ``L(w) = sum_i p_i L_i(w)``, not an average of per-batch estimates of a different thing.

**BatchNorm / dropout.** The measured loss is exactly ``loss_fn``. Curvature is normally measured
in *evaluation mode*: the model must use BatchNorm running statistics and no dropout, so that the
loss is a deterministic function of the weights. For Flax write, e.g.::

    def loss_fn(params, batch):
        logits = model.apply({"params": params, "batch_stats": batch_stats},
                             batch["x"], train=False)          # running statistics, no dropout
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

closing over the fixed ``batch_stats``. A train-mode ``loss_fn`` (batch statistics) also works, but
then the Hessian includes the dependence of the batch statistics on the weights.

**Compilation.** The jitted functions are cached per ``(loss_fn, has_aux)`` and take ``params``
and ``batch`` as arguments, so each is compiled once per shape and reused across calls, batches
and estimators. Define ``loss_fn`` once (not a fresh ``lambda`` per call) to benefit. A last batch
of a different size triggers one extra compilation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ..core.validate import invalid
from .common import Batch, prepare_batches

LossFn = Callable[[Any, Any], Any]
Params = Any


class _Compiled(NamedTuple):
    value: Callable  # (params, batch, delta_flat) -> scalar loss at params + delta
    value_and_grad: Callable  # (params, batch, delta_flat) -> (loss, flat grad) at params + delta
    hvp: Callable  # (params, batch, v_flat) -> flat H v
    hvp_block: Callable  # (params, batch, V (k, d)) -> (k, d) rows H v_i
    quad_block: Callable  # (params, batch, V (k, d)) -> (k,) quadratic forms v_iᵀ H v_i
    value_grid: Callable  # (params, batch, D (m, d), C (n, m)) -> (n,) losses at params + C @ D


def _add_flat(params: Params, delta: jax.Array) -> Params:
    """``params + unravel(delta)`` inside a trace (leaf dtypes are preserved)."""
    _, unravel = ravel_pytree(params)
    return jax.tree.map(lambda p, d: p + d.astype(p.dtype), params, unravel(delta))


def _compiled(loss_fn: LossFn, has_aux: bool) -> _Compiled:
    """Jitted building blocks for one loss function, cached per ``(loss_fn, has_aux)``.

    The cache keeps up to 64 loss functions alive (and whatever they close over); an unhashable
    ``loss_fn`` is compiled afresh for each :class:`HessianOperator`.
    """
    try:
        return _compiled_cached(loss_fn, has_aux)
    except TypeError:  # unhashable callable
        return _build(loss_fn, has_aux)


def _build(loss_fn: LossFn, has_aux: bool) -> _Compiled:
    """Define and jit the building blocks (each compiles lazily, on first use per shape)."""

    def scalar(p, b):
        out = loss_fn(p, b)
        if has_aux:
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                raise invalid("has_aux",
                           "False when loss_fn returns a scalar (True needs (loss, aux))", has_aux)
            out = out[0]
        out = jnp.asarray(out)
        if out.shape != ():
            raise invalid("loss_fn",
                       "a function returning a scalar loss (or (loss, aux) with has_aux=True)",
                       f"output of shape {out.shape}")
        return out

    def value(p, b, delta):
        return scalar(_add_flat(p, delta), b)

    def value_and_grad(p, b, delta):
        loss, g = jax.value_and_grad(scalar)(_add_flat(p, delta), b)
        return loss, ravel_pytree(g)[0]

    def hvp(p, b, v):
        _, unravel = ravel_pytree(p)
        tangent = jax.tree.map(lambda x, t: t.astype(x.dtype), p, unravel(v))
        _, hv = jax.jvp(lambda q: jax.grad(scalar)(q, b), (p,), (tangent,))
        return ravel_pytree(hv)[0]

    def hvp_block(p, b, vs):
        return jax.vmap(lambda v: hvp(p, b, v))(vs)

    def quad_block(p, b, vs):
        return jax.vmap(lambda v: jnp.vdot(v, hvp(p, b, v)))(vs)

    def value_grid(p, b, dirs, coeffs):
        return jax.vmap(lambda c: value(p, b, c @ dirs))(coeffs)

    return _Compiled(
        value=jax.jit(value),
        value_and_grad=jax.jit(value_and_grad),
        hvp=jax.jit(hvp),
        hvp_block=jax.jit(hvp_block),
        quad_block=jax.jit(quad_block),
        value_grid=jax.jit(value_grid),
    )


_compiled_cached = functools.lru_cache(maxsize=64)(_build)


class HessianOperator:
    """The Hessian of ``L(w) = sum_i p_i loss_fn(w, batch_i)`` at ``params`` as a linear operator.

    Vectors are flat (``jax.flatten_util.ravel_pytree`` order); use :meth:`hvp` for pytrees.
    Every estimator in :mod:`flatjax.sharpness` builds one of these; build it yourself to call
    several of them cheaply (construction only moves the batches to the device).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (or ``-> (scalar, aux)`` with ``has_aux``).
        Must be deterministic (evaluation mode: BatchNorm running statistics, no dropout).
      params: any pytree of float arrays; the point where the Hessian is taken.
      batch: one batch (any pytree); give either ``batch`` or ``batches``.
      batches: an iterable of batches; consumed once and kept in memory.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)`` (aux is ignored).
      weighting: ``"size"`` (default), ``"equal"`` or explicit per-batch weights; see the module doc.

    Method: forward-over-reverse HVP (Pearlmutter 1994), as in PyHessian (Yao et al. 2020).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Params,
        batch: Batch | None = None,
        *,
        batches: Iterable[Batch] | None = None,
        has_aux: bool = False,
        weighting: str | Sequence[float] = "size",
    ) -> None:
        if not callable(loss_fn):
            raise invalid("loss_fn", "a callable loss_fn(params, batch)", loss_fn)
        leaves = jax.tree.leaves(params)
        if not leaves or not all(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) for x in leaves):
            raise invalid("params", "a non-empty pytree of floating-point arrays", type(params).__name__)
        self.loss_fn = loss_fn
        self.has_aux = bool(has_aux)
        self.params = jax.tree.map(jnp.asarray, params)
        self.batches, self.weights = prepare_batches(batch, batches, weighting)
        flat, self.unravel = ravel_pytree(self.params)
        self.flat_params = flat
        self.dim = int(flat.size)
        self.dtype = flat.dtype
        self._fns = _compiled(loss_fn, self.has_aux)
        self._zero = jnp.zeros((self.dim,), self.dtype)

    # -- flat-vector interface ------------------------------------------------------------------
    def _sum(self, fn: Callable, *args: Any) -> Any:
        if len(self.batches) == 1:
            return fn(self.params, self.batches[0], *args)
        acc = None
        for b, w in zip(self.batches, self.weights.tolist()):
            out = jax.tree.map(lambda x: w * x, fn(self.params, b, *args))
            acc = out if acc is None else jax.tree.map(jnp.add, acc, out)
        return acc

    def matvec(self, v: jax.Array) -> jax.Array:
        """``H v`` for a flat vector ``v`` of length :attr:`dim`."""
        v = jnp.asarray(v, self.dtype)
        if v.shape != (self.dim,):
            raise invalid("v", f"a flat vector of shape ({self.dim},)", v.shape)
        return self._sum(self._fns.hvp, v)

    def matmat(self, vs: jax.Array) -> jax.Array:
        """Rows ``H v_i`` for a block ``vs`` of shape ``(k, dim)`` (vectorised with ``vmap``)."""
        vs = jnp.asarray(vs, self.dtype)
        if vs.ndim != 2 or vs.shape[1] != self.dim:
            raise invalid("vs", f"an array of shape (k, {self.dim})", vs.shape)
        return self._sum(self._fns.hvp_block, vs)

    def quadratic_forms(self, vs: jax.Array) -> jax.Array:
        """``v_iᵀ H v_i`` for each row of ``vs`` (shape ``(k, dim)``), in one compiled call per batch."""
        vs = jnp.asarray(vs, self.dtype)
        if vs.ndim != 2 or vs.shape[1] != self.dim:
            raise invalid("vs", f"an array of shape (k, {self.dim})", vs.shape)
        return self._sum(self._fns.quad_block, vs)

    def loss(self, delta: jax.Array | None = None) -> float:
        """Dataset loss ``L(w + delta)`` (``delta`` flat, default zero)."""
        d = self._zero if delta is None else jnp.asarray(delta, self.dtype)
        return float(self._sum(self._fns.value, d))

    def loss_and_grad(self, delta: jax.Array | None = None) -> tuple[float, jax.Array]:
        """``(L(w + delta), flat gradient of L at w + delta)``."""
        d = self._zero if delta is None else jnp.asarray(delta, self.dtype)
        loss, g = self._sum(self._fns.value_and_grad, d)
        return float(loss), g

    def loss_grid(self, directions: jax.Array, coeffs: jax.Array) -> jax.Array:
        """Losses ``L(w + coeffs[n] @ directions)`` for all rows of ``coeffs`` (vectorised)."""
        return self._sum(self._fns.value_grid, jnp.asarray(directions, self.dtype),
                         jnp.asarray(coeffs, self.dtype))

    # -- pytree interface -----------------------------------------------------------------------
    def hvp(self, v: Params) -> Params:
        """``H v`` for a pytree ``v`` with the structure of ``params``."""
        flat, _ = ravel_pytree(v)
        if flat.shape != (self.dim,):
            raise invalid("v", "a pytree with the same structure and shapes as params", type(v).__name__)
        return self.unravel(self.matvec(flat))

    def ravel(self, tree: Params) -> jax.Array:
        """Flatten a pytree shaped like ``params`` into the operator's vector space."""
        return jnp.asarray(ravel_pytree(tree)[0], self.dtype)


def hvp(
    loss_fn: LossFn,
    params: Params,
    v: Params,
    batch: Batch | None = None,
    *,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
) -> Params:
    """Hessian-vector product ``∇²L(params) v`` for pytrees (forward-over-reverse, Pearlmutter 1994).

    ``L`` is ``loss_fn`` on ``batch``, or the weighted mean over ``batches`` (see
    :class:`HessianOperator` for the arguments). Returns a pytree shaped like ``params``.
    The jitted HVP is cached per ``loss_fn``, so repeated calls do not recompile.
    """
    return HessianOperator(loss_fn, params, batch, batches=batches, has_aux=has_aux,
                           weighting=weighting).hvp(v)


def as_operator(
    loss_fn: LossFn | HessianOperator,
    params: Params | None,
    batch: Batch | None,
    batches: Iterable[Batch] | None,
    has_aux: bool,
    weighting: str | Sequence[float],
) -> HessianOperator:
    """Return ``loss_fn`` itself if it is a :class:`HessianOperator`, else build one."""
    if isinstance(loss_fn, HessianOperator):
        if params is not None or batch is not None or batches is not None:
            raise invalid("params/batch/batches", "None when a HessianOperator is passed as loss_fn",
                       "given")
        return loss_fn
    if params is None:
        raise invalid("params", "a pytree of floating-point arrays", params)
    return HessianOperator(loss_fn, params, batch, batches=batches, has_aux=has_aux,
                           weighting=weighting)


def to_numpy(x: Any) -> np.ndarray:
    """Host copy as float64 numpy (for the small dense linear algebra done on the host)."""
    return np.asarray(jax.device_get(x), dtype=np.float64)
