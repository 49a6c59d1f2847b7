"""The flatjax contract: a flat-minima method as an Optax ``GradientTransformationExtraArgs``.

A method wraps the user's ``loss_fn(params, batch, **loss_kwargs) -> loss`` (or ``(loss, aux)``).
Its ``update`` takes the usual Optax arguments plus keyword extra arguments, which ``optax.chain``
forwards to every member (unknown ones are ignored here, so other members may use their own)::

    updates, state = tx.update(updates, state, params,
                               batch=batch,                # required: handed to loss_fn
                               perturbed_batch=None,       # m-RWP/m-ARWP: batch B1 of the perturbed pass
                               loss_kwargs=None,           # e.g. {"batch_stats": ...}: not differentiated
                               clean_grad=None,            # optional: your ∇L_B(w), reused where possible
                               key=None)                   # overrides the state's PRNG stream

* ``updates`` is not read: the method evaluates every pass it needs itself, so independent passes can
  be evaluated together. Pass None, or any params-shaped tree (the gradients, or the params themselves)
  when a wrapper such as ``optax.apply_if_finite`` or ``optax.MultiSteps`` needs one.
* ``clean_grad``: if you already computed ``∇L_B(w)`` on ``batch``, methods whose rule contains it
  (SAM/ASAM without m-sharpness or ``axis_name``; m-RWP/m-ARWP) reuse it instead of a pass of their
  own; others ignore it. The step then reports ``loss = NaN`` and keeps the previous ``aux``: your own
  ``value_and_grad`` already has them. A flatjax method must be the FIRST member of a chain.
* The returned updates are the method's descent direction ``d`` (same structure and dtypes as
  ``params``); the following Optax members (momentum, weight decay, learning rate) turn it into a step.
* What a step measured is kept in the state: :func:`step_info` finds it in any (nested) Optax state:
  the reported ``loss`` and ``aux`` (each method documents which pass they come from — the unperturbed
  one where the method evaluates it), every probe loss, and method diagnostics (ρ, σ, norms ...).
* ``aux`` has a fixed structure kept in the state; give its initial value as ``aux_init`` (for Flax
  BatchNorm: the initial ``batch_stats``). Its values are replaced each step.
* Randomness: the state holds a PRNG key made from ``seed``; step ``t`` uses ``fold_in(key, t)``, so the
  same seed gives the same updates on every backend and strategy, and checkpoints resume exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from flatjax.core.evaluate import Evaluator, Probes, ShardMapProbes, Strategy, check_strategy
from flatjax.core.tree import PyTree, cast_like
from flatjax.core.validate import check_callable


class StepInfo(NamedTuple):
    """What the last step measured (see :func:`step_info`).

    Attributes:
      loss: the loss of the pass whose ``aux`` is reported (NaN where the clean gradient was reused).
      probe_losses: every loss the step evaluated, in the order the method documents.
      aux: the ``aux`` returned by ``loss_fn`` at the documented pass (``None`` without ``has_aux``).
      diagnostics: method-specific scalars (e.g. ``rho``, ``sigma``, ``grad_norm``).
    """

    loss: jax.Array
    probe_losses: jax.Array
    aux: PyTree
    diagnostics: dict


class FlatState(NamedTuple):
    """Optimizer state of a flatjax method."""

    count: jax.Array  # int32: completed updates (the step index schedules see)
    key: jax.Array  # raw uint32 PRNG key
    method: PyTree  # method-specific state (e.g. ARWP's squared-gradient history)
    info: StepInfo


class Direction(NamedTuple):
    """What a method's direction rule returns for one step."""

    updates: PyTree
    method: PyTree
    loss: jax.Array
    aux: PyTree | None  # None: keep the previous aux
    probe_losses: jax.Array
    diagnostics: dict


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Everything a direction rule may use in one step."""

    params: PyTree
    batch: PyTree
    perturbed_batch: PyTree
    clean_grad: PyTree | None  # the user's clean gradient, when given and reusable
    key: jax.Array
    count: jax.Array
    evaluator: Evaluator

    def value_and_grad(self, params, batch, *, reduce=True):
        return self.evaluator.value_and_grad(params, batch, reduce=reduce)

    def probes(self, points: Sequence[PyTree], batches: Sequence[PyTree], *, reduce=True) -> Probes:
        return self.evaluator.probes(points, batches, reduce=reduce)


NAN = float("nan")


def _raw_key(seed: Any) -> jax.Array:
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(seed)
    if isinstance(seed, jax.Array) and seed.shape == (2,):
        return seed.astype(jnp.uint32)
    return jax.random.key_data(jax.random.key(seed))


def _check_aux(aux: PyTree, aux_init: PyTree) -> PyTree:
    want, got = jax.tree.structure(aux_init), jax.tree.structure(aux)
    if want != got:
        raise ValueError(
            f"the aux returned by loss_fn has structure {got}, but aux_init has structure {want}; "
            "pass aux_init with the structure of the aux your loss returns"
        )
    return cast_like(aux, aux_init)


def flat_transformation(
    *,
    name: str,
    loss_fn: Callable[..., Any],
    direction: Callable[[StepContext, PyTree], Direction],
    init_method_state: Callable[[PyTree], PyTree],
    n_probes: int,
    diagnostics: Sequence[str],
    has_aux: bool,
    aux_init: PyTree,
    seed: Any,
    strategy: Strategy,
    axis_name: str | None,
    reuse_gradient: bool,
) -> optax.GradientTransformationExtraArgs:
    """Build a method from its direction rule (shared by every flatjax method; not for end users).

    Args:
      name: the public factory name, used in error messages.
      loss_fn: ``loss_fn(params, batch, **loss_kwargs)``.
      direction: ``direction(ctx, method_state) -> Direction``.
      init_method_state: ``params -> method_state``.
      n_probes: number of losses the method reports in ``probe_losses``.
      diagnostics: names of the scalar diagnostics the method reports.
      has_aux / aux_init: see the module docstring.
      seed: int seed or PRNG key.
      strategy: probe strategy, see :mod:`flatjax.core.evaluate`.
      axis_name: data-parallel axis of an enclosing shard_map, or None.
      reuse_gradient: whether a given ``clean_grad`` may replace the method's clean pass.
    """
    check_callable("loss_fn", loss_fn)
    strategy = check_strategy(strategy)
    if has_aux and aux_init is None:
        raise ValueError(
            f"{name}: has_aux=True needs aux_init, the initial value of the aux your loss returns "
            "(e.g. the model's initial batch_stats), so the state has a fixed structure"
        )
    if not has_aux and aux_init is not None:
        raise ValueError(f"{name}: aux_init is only used with has_aux=True")
    if axis_name is not None and isinstance(strategy, ShardMapProbes):
        raise ValueError(
            f"{name}: axis_name (an enclosing data-parallel shard_map) cannot be combined with "
            "strategy=ShardMapProbes; use 'sequential' or 'vmap' inside your own shard_map"
        )
    aux_template = jax.tree.map(jnp.asarray, aux_init) if has_aux else None

    def init_fn(params: PyTree) -> FlatState:
        info = StepInfo(
            loss=jnp.zeros((), jnp.float32),
            probe_losses=jnp.zeros((n_probes,), jnp.float32),
            aux=jax.tree.map(jnp.array, aux_template),  # a copy: the state never aliases user buffers
            diagnostics={k: jnp.zeros((), jnp.float32) for k in diagnostics},
        )
        return FlatState(
            count=jnp.zeros((), jnp.int32),
            key=_raw_key(seed),
            method=init_method_state(params),
            info=info,
        )

    def update_fn(
        updates: PyTree,
        state: FlatState,
        params: PyTree = None,
        *,
        batch: PyTree = None,
        perturbed_batch: PyTree = None,
        loss_kwargs: dict | None = None,
        clean_grad: PyTree = None,
        key: jax.Array | None = None,
        **unused_extra_args: Any,
    ):
        if params is None:
            raise ValueError(f"{name}: update needs params: tx.update(grads_or_None, state, params, batch=...)")
        if batch is None:
            raise ValueError(f"{name}: update needs the mini-batch: tx.update(..., batch=batch)")
        step_key = _raw_key(key) if key is not None else jax.random.fold_in(state.key, state.count)
        evaluator = Evaluator(loss_fn, has_aux, dict(loss_kwargs or {}), axis_name, strategy)
        ctx = StepContext(
            params=params,
            batch=batch,
            perturbed_batch=batch if perturbed_batch is None else perturbed_batch,
            clean_grad=clean_grad if reuse_gradient else None,
            key=step_key,
            count=state.count,
            evaluator=evaluator,
        )
        del updates  # never read: see the module docstring
        out = direction(ctx, state.method)
        aux = state.info.aux if (out.aux is None or not has_aux) else _check_aux(out.aux, aux_template)
        info = StepInfo(
            loss=jnp.asarray(out.loss, jnp.float32),
            probe_losses=jnp.asarray(out.probe_losses, jnp.float32).reshape((n_probes,)),
            aux=aux,
            diagnostics={k: jnp.asarray(out.diagnostics[k], jnp.float32) for k in diagnostics},
        )
        new_state = FlatState(optax.safe_increment(state.count), state.key, out.method, info)
        return cast_like(out.updates, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def step_info(opt_state: Any) -> StepInfo:
    """The :class:`StepInfo` of the flatjax method inside a (possibly nested) Optax state.

    Works through ``optax.chain``, ``inject_hyperparams``, ``MultiSteps`` and ``apply_if_finite``.
    """
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, FlatState))
        if isinstance(s, FlatState)
    ]
    if not found:
        raise ValueError("step_info: no flatjax method state found in opt_state")
    return found[0].info
