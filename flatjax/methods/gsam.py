"""GSAM: surrogate-gap guided SAM.

Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu, "Surrogate Gap Minimization Improves
Sharpness-Aware Training", ICLR 2022. SAM minimizes the perturbed loss ``f_p(w) = L(w + e)``; GSAM also
shrinks the surrogate gap ``h(w) = f_p(w) − L(w)`` (≈ ρ‖∇L‖ plus curvature) without undoing that
descent: it steps against the component of the clean gradient ``g`` ORTHOGONAL to ``∇f_p``::

    g = ∇L_B(w),   e = ρ g/(‖g‖ + ξ),   g_p = ∇L_B(w + e)
    g_⊥ = g − ⟨g, u⟩ u,   u = g_p/(‖g_p‖ + ξ)
    d = g_p − α g_⊥

Same two passes as SAM. In the paper ρ follows the learning rate, from ρ_max at the peak rate to ρ_min
at the lowest: pass ``rho=gsam_rho(lr_schedule, ...)`` from this module (``flatjax.methods.gsam``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flatjax.core import perturb
from flatjax.core.estimator import NAN, Direction, Estimator, StepContext, rule_estimator
from flatjax.core.schedule import Schedule, ScalarOrSchedule
from flatjax.core.tree import PyTree, add_scaled, global_norm, up, vdot
from flatjax.core.validate import check_callable, check_number, guarded


def gsam(
    loss_fn: Callable[..., Any],
    rho: ScalarOrSchedule = 0.05,
    alpha: ScalarOrSchedule = 0.1,
    *,
    axis_name: str | None = None,
    has_aux: bool = False,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Surrogate-gap guided SAM (Zhuang et al., ICLR 2022): ``d = ∇L(w + e) − α g_⊥``.

    ``g_⊥`` is the part of the clean gradient orthogonal to the perturbed one (see the module
    docstring); α = 0 is SAM exactly.

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      rho: radius ρ ≥ 0 (float or schedule; the paper ties it to the learning rate: :func:`gsam_rho`).
      alpha: α ≥ 0, the weight of the surrogate-gap descent (tune it; 0 gives SAM).
      axis_name, has_aux, trainable: as in :func:`sam`.

    Reports: ``loss``/``aux`` from the clean pass; ``probe_losses`` = [L(w), L(w + e)]; diagnostics
    ``rho``, ``alpha``, ``grad_norm`` (‖g‖) and ``surrogate_gap`` (L(w + e) − L(w)). A given
    ``clean_grad`` replaces the clean pass (loss and gap NaN).

    Example::

        >>> import jax.numpy as jnp, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> est = flatjax.estimators.gsam(loss_fn, rho=0.1, alpha=0.5)
        >>> params = {"x": jnp.array([1.0, 2.0])}
        >>> loss, grads, state, info = est.value_and_grad(params, est.init(params), jnp.zeros(2))
        >>> float(loss), sorted(info.diagnostics)
        (5.0, ['alpha', 'grad_norm', 'rho', 'surrogate_gap'])
        >>> import optax
        >>> tx = optax.chain(flatjax.gsam(loss_fn, rho=0.1, alpha=0.5), optax.sgd(0.1, momentum=0.9))
    """
    rho = guarded("rho", rho, low=0.0)
    alpha = guarded("alpha", alpha, low=0.0)

    def direction(ctx: StepContext, method_state: PyTree) -> Direction:
        r, a = ctx.value(rho), ctx.value(alpha)
        if ctx.clean_grad is not None:
            loss0, aux0, g = jnp.asarray(NAN, ctx.dtype), None, ctx.clean_grad
        else:
            loss0, aux0, g = ctx.value_and_grad(ctx.params, ctx.batch)
        loss1, _, g_p = ctx.value_and_grad(add_scaled(ctx.params, perturb.normalized_ascent(g, r)), ctx.batch)
        unit = perturb.normalized_ascent(g_p, 1.0)  # g_p / (‖g_p‖ + ξ)
        along = vdot(g, unit)

        def leaf(gp, g0, u):
            return (up(gp) - a * (up(g0) - along * up(u))).astype(gp.dtype)

        d = jax.tree.map(leaf, g_p, g, unit)
        diagnostics = {"rho": r, "alpha": a, "grad_norm": global_norm(g), "surrogate_gap": loss1 - loss0}
        return Direction(d, method_state, loss0, aux0, jnp.stack([loss0, loss1]), diagnostics)

    return rule_estimator(
        name="gsam", loss_fn=loss_fn, direction=direction, init_method_state=lambda p: (), n_probes=2,
        diagnostics=("rho", "alpha", "grad_norm", "surrogate_gap"), has_aux=has_aux, seed=0,
        strategy="sequential", axis_name=axis_name, reuse_gradient=True, trainable=trainable,
    )


def gsam_rho(lr_schedule: Schedule, rho_max: float, rho_min: float, lr_max: float, lr_min: float) -> Schedule:
    """GSAM's radius schedule: ``ρ_t = ρ_min + (ρ_max − ρ_min)(lr_t − lr_min)/(lr_max − lr_min)``.

    ``lr_schedule`` is the base optimizer's learning-rate schedule (a function of the step count); with
    ``lr_max == lr_min`` the radius is ``rho_max``.
    """
    check_callable("lr_schedule", lr_schedule)
    for name, value in (("rho_max", rho_max), ("rho_min", rho_min)):
        check_number(name, value, low=0.0)
    check_number("lr_max", lr_max)
    check_number("lr_min", lr_min, high=lr_max)

    def schedule(count):
        if lr_max == lr_min:
            return jnp.asarray(rho_max, jnp.float32)
        return rho_min + (rho_max - rho_min) * (lr_schedule(count) - lr_min) / (lr_max - lr_min)

    return schedule

