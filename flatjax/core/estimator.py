"""The estimator form of a flatjax method: a drop-in for ``jax.value_and_grad`` in any training loop.

An :class:`Estimator` wraps the user's ``loss_fn(params, batch, **loss_kwargs) -> loss`` (or
``(loss, aux)`` with ``has_aux=True``) and returns, instead of the plain gradient, the method's descent
direction, which any Optax optimizer then applies::

    est = flatjax.estimators.sam(loss_fn, rho=0.05, has_aux=True)
    est_state = est.init(params)
    (loss, aux), grads, est_state, info = est.value_and_grad(params, est_state, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)

``value_and_grad(params, state, batch, *, perturbed_batch=None, loss_kwargs=None, clean_grad=None,
key=None)``:

* ``perturbed_batch``: m-RWP/m-ARWP's batch B1 of the perturbed pass (default: ``batch``).
* ``loss_kwargs``: handed to every ``loss_fn`` call, not differentiated (e.g. ``{"model_state": ...}``).
* ``clean_grad``: your ``∇L_B(w)`` on ``batch`` if you already computed it. Methods whose rule contains
  it (SAM/ASAM without m-sharpness or per-device perturbations, m-RWP/m-ARWP, CR-SAM's code form, LETS)
  use it instead of a pass of their own, and then report ``loss = NaN`` and ``aux = None`` (your own
  pass has them). Under ``axis_name`` it must already be the device average. Other methods ignore it.
* ``key``: overrides the state's PRNG stream for this step.

It returns ``(loss, aux)`` (or ``loss`` without ``has_aux``), the direction (same structure and dtypes as
``params``), the new state and an :class:`Info` (every probe loss and the method's diagnostics).
``loss``/``aux`` come from the pass each method documents: the unperturbed one where the method
evaluates it, so Flax BatchNorm statistics are those of the clean pass.

Randomness: the state holds a PRNG key made from ``seed``; step ``t`` uses ``fold_in(key, t)``, so the
same seed gives the same directions on every backend and strategy, and checkpoints resume exactly.
Arithmetic runs in ``promote_types(param dtype, float32)``: float64 parameters (``jax_enable_x64``)
get float64 directions, bfloat16 ones float32 accumulation.

Every method is a direction rule given to :func:`rule_estimator` (LETS, which also updates its own
radius, builds its estimator directly). How to write one: ``docs/algorithms.md``, "Writing a method".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from flatjax.core import validate as checks
from flatjax.core.evaluate import Evaluator, Probes, ShardMapProbes, Strategy, after, check_strategy
from flatjax.core.schedule import ScalarOrSchedule, value_at
from flatjax.core.tree import PyTree, cast_like, compute_dtype, merge, select

NAN = float("nan")


class EstimatorState(NamedTuple):
    """State of an :class:`Estimator` built from a direction rule."""

    count: jax.Array  # int32: completed steps (the step index schedules see)
    key: jax.Array  # raw uint32 PRNG key
    method: PyTree  # method-specific state (e.g. ARWP's squared-gradient history)


class Info(NamedTuple):
    """What one estimator step measured besides ``loss``/``aux``.

    Attributes:
      probe_losses: every loss the step evaluated, in the order the method documents.
      diagnostics: method-specific scalars (e.g. ``rho``, ``sigma``, ``grad_norm``).
    """

    probe_losses: jax.Array
    diagnostics: dict


class Direction(NamedTuple):
    """What a method's direction rule returns for one step.

    Attributes:
      updates: the descent direction, a pytree like ``ctx.params``.
      method: the new method state (``()`` for stateless methods).
      loss: the loss reported as the step's loss (NaN where the rule did not measure it).
      aux: the ``aux`` of the pass the method documents; None when not measured this step (a reused
        clean gradient).
      probe_losses: every loss evaluated, ``n_probes`` of them, in the documented order.
      diagnostics: a dict of scalars containing at least the declared ``diagnostics`` names.
    """

    updates: PyTree
    method: PyTree
    loss: jax.Array
    aux: PyTree | None  # None: not measured this step (a reused clean gradient)
    probe_losses: jax.Array
    diagnostics: dict


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Everything a direction rule may use in one step.

    Attributes:
      params: the parameters the rule works on (only the trainable leaves when ``trainable`` is set).
      batch: the step's mini-batch.
      perturbed_batch: the second batch given as ``perturbed_batch=`` (m-(A)RWP's B1), else ``batch``.
      clean_grad: the user's ``∇L_B(w)`` when given and the estimator was built with
        ``reuse_gradient=True``; None otherwise (then compute it yourself).
      key: this step's PRNG key (``fold_in(seed key, count)``, or the ``key=`` handed to the step).
      count: int32 number of completed steps (what schedules see).
      evaluator: the probe evaluator (use the methods below rather than calling it directly).
      dtype: the arithmetic dtype, ``promote_types(param dtype, float32)``.
    """

    params: PyTree
    batch: PyTree
    perturbed_batch: PyTree
    clean_grad: PyTree | None  # the user's clean gradient, when given and reusable
    key: jax.Array
    count: jax.Array
    evaluator: Evaluator
    dtype: Any  # the arithmetic dtype: promote_types(param dtype, float32)

    def value(self, hyper: ScalarOrSchedule) -> jax.Array:
        """A hyper-parameter (float or schedule) at this step, in the arithmetic dtype."""
        return value_at(hyper, self.count, self.dtype)

    def value_and_grad(self, params, batch, *, reduce=True):
        """``(loss, aux, grad)`` of ``loss_fn`` at ``params`` on ``batch`` (one gradient pass).

        ``aux`` is None without ``has_aux``. Under ``axis_name`` the loss and gradient are averaged over
        devices unless ``reduce=False`` (the device's own gradient, e.g. per-device perturbations).
        """
        return self.evaluator.value_and_grad(params, batch, reduce=reduce)

    def loss_and_aux(self, params, batch, *, reduce=True):
        """``(loss, aux)`` of ``loss_fn`` at ``params`` on ``batch``: a forward pass, no gradient (a third of
        a gradient pass's FLOPs), e.g. for a point whose loss and aux are reported but not differentiated."""
        return self.evaluator.loss_and_aux(params, batch, reduce=reduce)

    def probes(self, *, points: Sequence[PyTree] | None = None, batches: Sequence[PyTree] | None = None,
               params: PyTree = None, batch: PyTree = None, reduce: bool = True) -> Probes:
        """Evaluate at several INDEPENDENT points: give ``points`` (one per probe) or one shared
        ``params``, and ``batches`` (one per probe) or one shared ``batch``. A point of the form
        ``w + s·Δ`` may be given as ``flatjax.core.evaluate.Shifted(w, Δ, s)``: the "sequential" strategy then
        builds it only when its pass starts, so the shifted copies of the weights are not all alive at once.

        Returns :class:`~flatjax.core.evaluate.Probes` ``(losses, aux, grads)`` stacked along a leading
        probe axis (take one with :func:`flatjax.core.tree.index`). The estimator's ``strategy`` decides
        how they run (one after another, vmapped, or on device groups); the result is the same.
        """
        return self.evaluator.probes(points=points, batches=batches, params=params, batch=batch, reduce=reduce)

    def sequential(self, n_probes: int = 2) -> bool:
        """Whether :meth:`probes` runs ``n_probes`` probes on this step's batch one after another (the
        "sequential" strategy, given or resolved from "auto"). A rule may then reorder its work to hold less
        memory (CR-SAM combines the first probe's gradient before the second pass starts)."""
        return self.evaluator.resolved_strategy(n_probes, self.batch) == "sequential"

    def after(self, params: PyTree, batch: PyTree, grads: PyTree) -> tuple[PyTree, PyTree]:
        """``(params, batch)``, made to wait for ``grads`` under the "sequential" strategy (one pass at a
        time, so the peak memory is one pass's); unchanged under the parallel strategies."""
        return after(params, batch, grads) if self.sequential() else (params, batch)

    def probes_stacked(self, points: PyTree, batch: PyTree, *, reduce: bool = True) -> Probes:
        """Evaluate at every slice of stacked ``points`` (leaves with a leading probe axis) on one batch,
        tracing the gradient once: compile time does not grow with the number of probes."""
        return self.evaluator.probes_stacked(points, batch, reduce=reduce)


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A flatjax method in estimator form (see the module docstring).

    Attributes:
      name: the factory name, used in error messages.
      init: ``params -> state``.
      value_and_grad: ``(params, state, batch, **kw) -> (value, direction, state, info)``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      n_probes: the length of ``info.probe_losses``.
      diagnostics: the names in ``info.diagnostics``.
    """

    name: str
    init: Callable[[PyTree], Any]
    value_and_grad: Callable[..., tuple]
    has_aux: bool
    n_probes: int
    diagnostics: tuple[str, ...]


def rule_estimator(
    *,
    name: str,
    loss_fn: Callable[..., Any],
    direction: Callable[[StepContext, PyTree], Direction],
    init_method_state: Callable[[PyTree], PyTree],
    n_probes: int,
    diagnostics: Sequence[str],
    has_aux: bool,
    seed: Any,
    strategy: Strategy,
    axis_name: str | None,
    reuse_gradient: bool,
    rejects_clean_grad: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Build an :class:`Estimator` from a direction rule (the shared machinery of every method).

    Args:
      name: the public factory name, used in error messages.
      loss_fn: ``loss_fn(params, batch, **loss_kwargs)``.
      direction: ``direction(ctx, method_state) -> Direction``.
      init_method_state: ``params -> method_state``.
      n_probes: number of losses the method reports in ``probe_losses``.
      diagnostics: names of the scalar diagnostics the method reports.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      seed: int seed or PRNG key.
      strategy: probe strategy, see :mod:`flatjax.core.evaluate`.
      axis_name: data-parallel axis of an enclosing shard_map/pmap, or None.
      reuse_gradient: whether a given ``clean_grad`` replaces the method's clean pass.
      rejects_clean_grad: if set, a given ``clean_grad`` raises ``ValueError`` with this reason (the rule
        needs a gradient that a whole-batch ``clean_grad`` cannot stand for).
      trainable: None (every parameter), or a pytree of bools like params (or ``params -> tree``): the
        rule then runs on the trainable leaves only — frozen leaves are neither perturbed nor counted in
        norms or noise — and their direction is zero.

    The estimator checks its inputs, builds the :class:`StepContext`, calls ``direction``, checks the
    declared diagnostics, casts the direction to the parameters' dtypes and advances the step count.
    Full guide: ``docs/algorithms.md``, "Writing a method".

    Example (a two-pass rule written from scratch: the gradient at ``w − 0.1 g``, "look-behind")::

        >>> import jax.numpy as jnp
        >>> from flatjax.core import Direction, rule_estimator
        >>> from flatjax.core.tree import add_scaled
        >>> def direction(ctx, method_state):
        ...     loss, aux, g = ctx.value_and_grad(ctx.params, ctx.batch)
        ...     step = ctx.value(0.1)
        ...     loss1, _, d = ctx.value_and_grad(add_scaled(ctx.params, g, -step), ctx.batch)
        ...     return Direction(d, method_state, loss, aux, jnp.stack([loss, loss1]), {"step": step})
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> est = rule_estimator(name="lookbehind", loss_fn=loss_fn, direction=direction,
        ...                      init_method_state=lambda params: (), n_probes=2, diagnostics=("step",),
        ...                      has_aux=False, seed=0, strategy="sequential", axis_name=None,
        ...                      reuse_gradient=False)
        >>> params = {"x": jnp.array([1.0, 2.0])}
        >>> loss, d, state, info = est.value_and_grad(params, est.init(params), jnp.zeros(2))
        >>> [round(float(x), 4) for x in d["x"]], [round(float(x), 4) for x in info.probe_losses]
        ([1.6, 3.2], [5.0, 3.2])
        >>> int(state.count)
        1
    """
    checks.check_callable("loss_fn", loss_fn)
    checks.check_bool("has_aux", has_aux)
    strategy = check_strategy(strategy)
    checks.check_axis_name("axis_name", axis_name)
    if axis_name is not None and isinstance(strategy, ShardMapProbes):
        raise ValueError(
            f"{name}: axis_name (an enclosing data-parallel shard_map) cannot be combined with "
            "strategy=ShardMapProbes; use 'sequential' or 'vmap' inside your own shard_map"
        )
    diagnostics = tuple(diagnostics)
    base_key = checks.raw_key(seed)

    def init(params: PyTree) -> EstimatorState:
        checks.check_params(name, params)
        if trainable is not None:
            params = select(params, checks.resolve_trainable(name, trainable, params))
        return EstimatorState(count=jnp.zeros((), jnp.int32), key=jnp.array(base_key),
                              method=init_method_state(params))

    def value_and_grad(
        params: PyTree,
        state: EstimatorState,
        batch: PyTree,
        *,
        perturbed_batch: PyTree = None,
        loss_kwargs: dict | None = None,
        clean_grad: PyTree = None,
        key: jax.Array | None = None,
    ):
        checks.check_state(name, state, EstimatorState, "est.init(params)")
        if batch is None:
            raise ValueError(f"{name}: value_and_grad needs the mini-batch: est.value_and_grad(params, state, batch)")
        checks.check_data_parallel(name, params, batch, axis_name)
        if clean_grad is not None:
            checks.check_like_params(name, "clean_grad", clean_grad, params)
            if rejects_clean_grad is not None:
                raise ValueError(f"{name}: clean_grad cannot be used here: {rejects_clean_grad}")
        step_key = checks.raw_key(key) if key is not None else jax.random.fold_in(state.key, state.count)
        full, rule_params, rule_loss = params, params, loss_fn
        if trainable is not None:  # the rule sees the trainable leaves; the loss gets them merged back
            mask = checks.resolve_trainable(name, trainable, params)
            rule_params = select(params, mask)
            clean_grad = None if clean_grad is None else select(clean_grad, mask)

            def rule_loss(sub, batch, **kw):
                return loss_fn(merge(sub, full, mask), batch, **kw)

        evaluator = Evaluator(rule_loss, has_aux, dict(loss_kwargs or {}), axis_name, strategy)
        ctx = StepContext(
            params=rule_params,
            batch=batch,
            perturbed_batch=batch if perturbed_batch is None else perturbed_batch,
            clean_grad=clean_grad if reuse_gradient else None,
            key=step_key,
            count=state.count,
            evaluator=evaluator,
            dtype=compute_dtype(params),
        )
        out = direction(ctx, state.method)
        updates = out.updates
        if trainable is not None:
            updates = merge(updates, jax.tree.map(jnp.zeros_like, full), mask)
        missing = set(diagnostics) - set(out.diagnostics)
        if missing:
            raise ValueError(f"{name}: the rule did not report the declared diagnostics {sorted(missing)}")
        info = Info(
            probe_losses=jnp.reshape(jnp.asarray(out.probe_losses), (n_probes,)),
            diagnostics={k: jnp.asarray(out.diagnostics[k]) for k in diagnostics},
        )
        new_state = EstimatorState(optax.safe_increment(state.count), state.key, out.method)
        value = (out.loss, out.aux) if has_aux else out.loss
        return value, cast_like(updates, params), new_state, info

    return Estimator(name=name, init=init, value_and_grad=value_and_grad, has_aux=has_aux,
                     n_probes=n_probes, diagnostics=diagnostics)


def gradient(loss_fn: Callable[..., Any], *, has_aux: bool = False, axis_name: str | None = None) -> Estimator:
    """Plain SGD's estimator: ``jax.value_and_grad`` in the estimator contract (one pass, no state).

    The trivial member of the family, so a training loop can switch between SGD and any flatjax method
    by swapping the estimator. With ``axis_name`` the gradient of the device-average loss is returned.

    Example::

        >>> import jax.numpy as jnp, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params = {"x": jnp.array([1.0, 2.0])}
        >>> est = flatjax.estimators.sgd(loss_fn)
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), jnp.zeros(2))
        >>> float(loss), grads["x"].tolist()
        (5.0, [2.0, 4.0])
    """

    def direction(ctx: StepContext, method_state: PyTree) -> Direction:
        if ctx.clean_grad is not None:
            return Direction(ctx.clean_grad, method_state, jnp.asarray(NAN, ctx.dtype), None,
                             jnp.full((1,), NAN, ctx.dtype), {})
        loss, aux, grad = ctx.value_and_grad(ctx.params, ctx.batch)
        return Direction(grad, method_state, loss, aux, jnp.stack([loss]), {})

    return rule_estimator(
        name="sgd", loss_fn=loss_fn, direction=direction, init_method_state=lambda p: (), n_probes=1,
        diagnostics=(), has_aux=has_aux, seed=0, strategy="sequential", axis_name=axis_name,
        reuse_gradient=True,
    )
