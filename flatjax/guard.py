"""Skip steps whose updates are not finite, leaving parameters and every optimizer state untouched."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flatjax.core.estimator import EstimatorState
from flatjax.core.transform import FlatState
from flatjax.core.tree import PyTree, is_finite
from flatjax.methods.lets import LetsEstimatorState


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`."""

    notfinite_count: jax.Array  # consecutive skipped steps
    total_notfinite: jax.Array  # all skipped steps
    last_finite: jax.Array  # whether the last step was applied
    inner_state: Any


def keep_finite(ok: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """``new`` where ``ok``, else ``old``, leaf by leaf — except the step counts of flatjax states.

    The count of every flatjax method state (Optax form ``FlatState``, estimator ``EstimatorState`` and
    ``LetsEstimatorState``) and the Optax form's last ``StepInfo`` always take the new values: after a
    skipped step the next one draws FRESH noise (a NaN caused by one noise draw is not replayed for ever)
    and reports what the skipped step measured. Use it in your own estimator loop::

        ok = flatjax.guard.is_finite(updates)
        params, opt_state, est_state = flatjax.guard.keep_finite(
            ok, (new_params, new_opt_state, new_est_state), (params, opt_state, est_state))
    """
    keep = lambda n, o: jnp.where(ok, n, o)  # noqa: E731

    def pick(n, o):
        if isinstance(n, FlatState):
            return FlatState(count=n.count, key=o.key, method=jax.tree.map(keep, n.method, o.method), info=n.info)
        if isinstance(n, (EstimatorState, LetsEstimatorState)):
            return jax.tree.map(keep, n, o)._replace(count=n.count)
        return jax.tree.map(keep, n, o)

    counted = (FlatState, EstimatorState, LetsEstimatorState)
    return jax.tree.map(pick, new, old, is_leaf=lambda x: isinstance(x, counted))


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` and apply its result only when the produced updates are all finite.

    ``optax.apply_if_finite`` checks the gradients handed IN; a flatjax method computes its own
    gradients (at perturbed points too), so a NaN/Inf can appear only inside it. This wrapper checks the
    updates coming OUT of ``inner`` (e.g. ``optax.chain(flatjax.marwp(...), optax.sgd(...))``): on a
    non-finite step it returns zero updates, keeps the previous inner state (momentum, ARWP history,
    LETS's radius, the base optimizer's count) and counts the skip. The flatjax method's own step count
    still advances, so the next step draws FRESH noise (a NaN caused by one noise draw is not repeated
    for ever) and its schedules see attempted steps; :func:`flatjax.step_info` then reports the skipped
    step's measurements (e.g. its NaN loss), so do not take BatchNorm statistics from it without checking
    ``last_finite``. Unlike ``apply_if_finite`` it never applies a non-finite update: watch
    ``notfinite_count`` (consecutive skips) and stop a run where it keeps growing.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: PyTree) -> SkipNonfiniteState:
        # distinct buffers for every leaf: the state may be donated to a jitted step
        return SkipNonfiniteState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), jnp.array(True),
                                  inner.init(params))

    def update_fn(updates, state: SkipNonfiniteState, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        ok = is_finite(new_updates)
        new_updates = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
        new_inner = keep_finite(ok, new_inner, state.inner_state)
        bad = jnp.logical_not(ok).astype(jnp.int32)
        return new_updates, SkipNonfiniteState(
            notfinite_count=(state.notfinite_count + bad) * bad,
            total_notfinite=state.total_notfinite + bad,
            last_finite=ok,
            inner_state=new_inner,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
