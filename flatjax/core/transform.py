"""The Optax form of a flatjax method: a thin ``GradientTransformationExtraArgs`` over its estimator.

``optax.chain`` forwards keyword extra arguments to every member (unknown ones are ignored here, so
other members may take their own)::

    updates, state = tx.update(None, state, params,
                               batch=batch,                # required: handed to loss_fn
                               perturbed_batch=None,       # m-RWP/m-ARWP: batch B1 of the perturbed pass
                               loss_kwargs=None,           # e.g. {"model_state": ...}: not differentiated
                               clean_grad=None,            # optional: your ∇L_B(w), reused where possible
                               key=None)                   # overrides the state's PRNG stream

* ``updates`` is replaced by the method's descent direction ``d`` (same structure and dtypes as
  ``params``); the following Optax members (momentum, weight decay, clipping, learning rate) turn it into
  a step. Hand in ``None``, or (where a wrapper such as ``optax.apply_if_finite`` needs a gradient) your
  clean gradient as BOTH ``updates`` and ``clean_grad=``: it is then reused where the rule contains it.
  Any other ``updates`` raise: they come from a member chained BEFORE the method (e.g. clipping) or from
  ``optax.MultiSteps`` wrapped around the whole chain (accumulated gradients), whose effect the method
  would silently drop. Put such members after the method.
* What a step measured is kept in the state: :func:`step_info` finds it in any (nested) Optax state.
  ``aux`` has a fixed structure kept in the state, so give its initial value as ``aux_init`` (for Flax
  BatchNorm: the initial ``batch_stats``); the estimator form (``flatjax.estimators``) returns it instead.
* Randomness, schedules and strategies as in the estimator form (:mod:`flatjax.core.estimator`).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flatjax.core.estimator import Estimator, EstimatorState
from flatjax.core.tree import PyTree, cast_like, compute_dtype
from flatjax.core.validate import check_extra_args

#: The keyword extra arguments of a method's ``update`` (near-misses of these raise).
UPDATE_ARGS = ("batch", "perturbed_batch", "loss_kwargs", "clean_grad", "key")


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
    """Optimizer state of a flatjax method (its estimator state and the last :class:`StepInfo`)."""

    count: jax.Array  # int32: completed updates (the step index schedules see)
    key: jax.Array  # raw uint32 PRNG key
    method: PyTree  # method-specific state (e.g. ARWP's squared-gradient history)
    info: StepInfo


def check_aux(name: str, aux: PyTree, aux_init: PyTree) -> PyTree:
    """``aux`` cast to the dtypes of ``aux_init``; ``ValueError`` when the structure or a dtype kind differs."""
    want, got = jax.tree.structure(aux_init), jax.tree.structure(aux)
    if want != got:
        raise ValueError(
            f"{name}: the aux returned by loss_fn has structure {got}, but aux_init has structure {want}; "
            "pass aux_init with the structure of the aux your loss returns"
        )
    for a, b in zip(jax.tree.leaves(aux), jax.tree.leaves(aux_init)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(f"{name}: loss_fn returns an aux leaf of shape {jnp.shape(a)} where aux_init has "
                             f"shape {jnp.shape(b)}; give aux_init the shapes of the aux your loss returns")
        if jnp.issubdtype(jnp.result_type(a), jnp.inexact) and not jnp.issubdtype(jnp.result_type(b), jnp.inexact):
            raise ValueError(
                f"{name}: loss_fn returns a floating aux leaf ({jnp.result_type(a)}) where aux_init has "
                f"{jnp.result_type(b)}; storing it would truncate it. Give aux_init floating leaves there."
            )
    return cast_like(aux, aux_init)


def empty_info(estimator: Estimator, aux_init: PyTree, dtype: Any) -> StepInfo:
    """The :class:`StepInfo` of a state before its first update."""
    return StepInfo(
        loss=jnp.zeros((), dtype),
        probe_losses=jnp.zeros((estimator.n_probes,), dtype),
        aux=jax.tree.map(jnp.array, aux_init),  # a copy: the state never aliases user buffers
        diagnostics={k: jnp.zeros((), dtype) for k in estimator.diagnostics},
    )


def check_not_masked(name: str, params: PyTree) -> None:
    """``optax.masked`` hides the masked-out parameters, which the loss needs: point to ``trainable=``."""
    if any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode))):
        raise ValueError(
            f"{name}: got params with optax.MaskedNode leaves (optax.masked around a flatjax method?). The loss "
            f"needs every parameter; to freeze some, pass trainable=<pytree of bools> to flatjax.{name} instead")


def updates_as_clean_grad(name: str, updates: PyTree, clean_grad: PyTree) -> None:
    """Raise unless ``updates`` is None or the very ``clean_grad`` object (leaf for leaf) the caller passed."""
    if updates is None:
        return
    if clean_grad is not None and jax.tree.structure(updates) == jax.tree.structure(clean_grad) and all(
        a is b for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(clean_grad))
    ):
        return
    raise ValueError(
        f"{name}: the updates handed in are not None and not the clean_grad you passed. A flatjax method "
        "replaces its input with its own direction, so whatever produced these updates would be silently "
        "dropped: a member chained BEFORE the method (e.g. clipping), or optax.MultiSteps wrapped around the "
        "whole chain (accumulated gradients; the method would see only the last micro-batch). Call "
        "tx.update(None, ...) and put such members after the method, e.g. optax.chain(flatjax."
        f"{name}(...), optax.clip_by_global_norm(1.0), optax.sgd(...)) or MultiSteps around the base "
        "optimizer; or pass your clean gradient as both updates and clean_grad=; or use the estimator form "
        f"flatjax.estimators.{name} in your own loop."
    )


def aux_template_of(estimator: Estimator, aux_init: PyTree) -> PyTree:
    """The Optax form's fixed aux structure: ``aux_init`` as arrays (None without ``has_aux``)."""
    name = estimator.name
    if estimator.has_aux and aux_init is None:
        raise ValueError(
            f"{name}: has_aux=True needs aux_init, the initial value of the aux your loss returns (e.g. the "
            "model's initial batch_stats), so the Optax state has a fixed structure; the estimator form "
            f"flatjax.estimators.{name} returns aux instead and needs no aux_init"
        )
    if not estimator.has_aux and aux_init is not None:
        raise ValueError(f"{name}: aux_init is only used with has_aux=True")
    return jax.tree.map(jnp.asarray, aux_init) if estimator.has_aux else None


def as_transformation(estimator: Estimator, *, aux_init: PyTree = None) -> optax.GradientTransformationExtraArgs:
    """The Optax form of an estimator built by ``rule_estimator`` (see the module docstring)."""
    name = estimator.name
    aux_template = aux_template_of(estimator, aux_init)

    def init_fn(params: PyTree) -> FlatState:
        est = estimator.init(params)
        return FlatState(est.count, est.key, est.method, empty_info(estimator, aux_template, compute_dtype(params)))

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
            raise ValueError(f"{name}: update needs params: tx.update(None, state, params, batch=...)")
        if batch is None:
            raise ValueError(f"{name}: update needs the mini-batch: tx.update(..., batch=batch)")
        if not isinstance(state, FlatState):
            raise ValueError(f"{name}: state must be the FlatState made by tx.init(params), got {type(state).__name__}")
        check_extra_args(name, unused_extra_args, UPDATE_ARGS)
        check_not_masked(name, params)
        updates_as_clean_grad(name, updates, clean_grad)
        value, direction, est, info = estimator.value_and_grad(
            params, EstimatorState(state.count, state.key, state.method), batch,
            perturbed_batch=perturbed_batch, loss_kwargs=loss_kwargs, clean_grad=clean_grad, key=key,
        )
        loss, aux = value if estimator.has_aux else (value, None)
        aux = state.info.aux if aux is None else check_aux(name, aux, aux_template)
        new_info = cast_like(StepInfo(loss, info.probe_losses, aux, info.diagnostics), state.info)
        return direction, FlatState(est.count, est.key, est.method, new_info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def optax_form(
    estimator_factory: Callable[..., Estimator],
    adapter: Callable[..., optax.GradientTransformationExtraArgs] = as_transformation,
) -> Callable[..., optax.GradientTransformationExtraArgs]:
    """The Optax-form factory of an estimator factory: same arguments plus ``aux_init``.

    ``optax.chain(flatjax.sam(loss_fn, 0.05), optax.sgd(0.1))`` is the estimator
    ``flatjax.estimators.sam(loss_fn, 0.05)`` behind ``tx.update``; see :mod:`flatjax.core.transform`.
    ``adapter(estimator, aux_init=...)`` builds the transformation (default :func:`as_transformation`).
    """
    signature = inspect.signature(estimator_factory)
    aux_param = inspect.Parameter("aux_init", inspect.Parameter.KEYWORD_ONLY, default=None)
    params = list(signature.parameters.values())
    has_var_kw = params and params[-1].kind == inspect.Parameter.VAR_KEYWORD
    params = params[:-1] + [aux_param, params[-1]] if has_var_kw else params + [aux_param]

    @functools.wraps(estimator_factory)
    def factory(*args, aux_init: PyTree = None, **kwargs) -> optax.GradientTransformationExtraArgs:
        return adapter(estimator_factory(*args, **kwargs), aux_init=aux_init)

    factory.__signature__ = signature.replace(parameters=params, return_annotation=optax.GradientTransformationExtraArgs)
    del factory.__wrapped__  # inspect.signature must see aux_init
    factory.__doc__ = (
        f"Optax form of :func:`flatjax.estimators.{estimator_factory.__name__}` (same arguments, plus "
        "``aux_init``: the initial aux when ``has_aux``, for the state's fixed structure).\n\n"
        + (estimator_factory.__doc__ or "")
    )
    return factory


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
