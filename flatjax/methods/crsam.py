"""CR-SAM: SAM plus a curvature regularizer from finite differences along the gradient direction.

Wu, Luo, Wunsch, "CR-SAM: Curvature Regularized Sharpness-Aware Minimization", AAAI 2024 (official code
TrustAIoT/CR-SAM). With ``v = g/(‖g‖ + ξ)``, ``L± = L_B(w ± ρv)``, ``L0 = L_B(w)``:
curvature ``c = L+ + L− − 2L0 ≈ ρ² vᵀHv`` and slope ``s = L+ − L− ≈ 2ρ vᵀg``. The ± passes are
independent and evaluated together by the probe strategy (2 passes on the critical path). Under the
"sequential" strategy the code form folds g and ∇L+ into one stored buffer before the − pass starts
(:func:`combine_partial`, :func:`combine_rest`), so that pass holds one gradient-sized buffer, not two.

Two forms:

* ``form="code"`` (default; the released code, which produced the paper's numbers): the gradient of
  ``α c + β s`` with v held fixed: ``d = ∇L+ + α(∇L+ + ∇L− − 2g) + β(∇L+ − ∇L−)``.
* ``form="log"`` (the paper's ``R_c = α log c + β log s``): ``d = ∇L+ + α(∇L+ + ∇L− − 2g)/c +
  β(∇L+ − ∇L−)/s``. Where ``c`` or ``s`` ≤ ``log_floor`` (a flat or non-convex direction, or a zero
  gradient) the logarithm's argument is clamped at ``log_floor`` and that term's gradient is ZERO
  (the clamped function is constant there), so the step falls back to SAM for that term.

The paper writes its regularizer with random directions ``v ~ N(0, I)`` and then restricts ``v`` to the
normalized gradient, as here. Its released code drops the logarithms (no division by ``c`` and ``s``)
and calls α ``gamma``. Details and the papers' settings: ``docs/algorithms.md`` (CR-SAM).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flatjax.core import perturb
from flatjax.core.estimator import NAN, Direction, Estimator, StepContext, rule_estimator
from flatjax.core.evaluate import Shifted, Strategy, materialized
from flatjax.core.schedule import ScalarOrSchedule
from flatjax.core.tree import PyTree, global_norm, index, up
from flatjax.core.validate import check_choice, check_number, guarded

FORMS = ("code", "log")


def combine(grad_plus: PyTree, grad_minus: PyTree, grad: PyTree, wc: jax.Array, ws: jax.Array) -> PyTree:
    """CR-SAM's direction ``∇L+ + wc (∇L+ + ∇L− − 2g) + ws (∇L+ − ∇L−)`` (promoted-dtype accumulation).

    ``wc, ws`` are α, β in the code form and α/c, β/s (clamped) in the log form. A public building
    block: LETS uses it for its CR-SAM inner method, and new methods may too.

    Example::

        >>> import jax.numpy as jnp
        >>> from flatjax.methods.crsam import combine
        >>> d = combine({"x": jnp.array(3.0)}, {"x": jnp.array(1.0)}, {"x": jnp.array(2.0)}, 0.5, 0.1)
        >>> round(float(d["x"]), 4)   # 3 + 0.5·(3 + 1 − 4) + 0.1·(3 − 1)
        3.2
    """

    def leaf(p, m, g0):
        p32, m32, g32 = up(p), up(m), up(g0)
        return (p32 + wc * (p32 + m32 - 2.0 * g32) + ws * (p32 - m32)).astype(p.dtype)

    return jax.tree.map(leaf, grad_plus, grad_minus, grad)


def combine_partial(grad_plus: PyTree, grad: PyTree, wc: jax.Array, ws: jax.Array) -> PyTree:
    """The part of :func:`combine` known before ``∇L−``: ``(1 + wc + ws) ∇L+ − 2 wc g`` (promoted dtype)."""
    return jax.tree.map(lambda p, g0: (1.0 + wc + ws) * up(p) - 2.0 * wc * up(g0), grad_plus, grad)


def combine_rest(partial: PyTree, grad_minus: PyTree, wc: jax.Array, ws: jax.Array) -> PyTree:
    """:func:`combine` from :func:`combine_partial`'s result: ``partial + (wc − ws) ∇L−``, in ∇L−'s dtype."""
    return jax.tree.map(lambda q, m: (q + (wc - ws) * up(m)).astype(m.dtype), partial, grad_minus)


def crsam(
    loss_fn: Callable[..., Any],
    rho: ScalarOrSchedule = 0.1,
    alpha: ScalarOrSchedule = 0.1,
    beta: ScalarOrSchedule = 0.01,
    *,
    form: str = "code",
    log_floor: float = 1e-12,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    axis_name: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Curvature-Regularized SAM (Wu et al., AAAI 2024).

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      rho: ρ ≥ 0, SAM's radius, also the finite-difference step (CIFAR-10 0.10, CIFAR-100 0.15).
      alpha: α ≥ 0, curvature (trace) weight — the code's ``gamma`` (CIFAR-10 0.1, CIFAR-100 0.5).
      beta: β ≥ 0, slope (gradient-norm) weight (0.01). α = β = 0 gives SAM exactly.
      form: 'code' (default) or 'log', see the module docstring.
      log_floor: > 0, clamp of the logarithm's argument in the 'log' form.
      has_aux, strategy, axis_name, trainable: as in :func:`sam`.

    Reports: ``loss``/``aux`` from the clean pass; ``probe_losses`` = [L0, L+, L−]; diagnostics ``rho``,
    ``alpha``, ``beta``,
    ``grad_norm`` (‖g‖), ``curvature`` (c/ρ² ≈ vᵀHv), ``slope`` (s/(2ρ) ≈ ‖g‖),
    ``normalized_curvature`` (c/ρ² / ‖g‖: the step's estimate of CR-SAM's normalized Hessian trace
    along v) and ``regularizer`` (α log c + β log s with the clamp, whichever form is used). In the code
    form a given ``clean_grad`` replaces the clean pass (loss and the L0-based diagnostics are then NaN);
    the log form needs L0 and raises.

    Precision of the log form: ``c = L+ + L− − 2L0`` is a small difference of losses and the update divides
    by it, so float32 round-off in the losses is amplified — probe strategies (which sum in different
    orders) agree to about 1e-6 relative per step and drift apart to about 1e-5 over tens of steps.
    With float64 parameters (``jax_enable_x64``) the rule is exact to about 1e-12.

    Example (on ``L = ‖w‖²``: ``vᵀHv = 2`` and the slope estimate is ``‖g‖``)::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2)
        >>> est = flatjax.estimators.crsam(loss_fn, rho=0.1, alpha=0.1, beta=0.01)
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch)
        >>> [round(float(x), 4) for x in info.probe_losses]         # [L0, L+, L−]
        [5.0, 5.4572, 4.5628]
        >>> round(float(info.diagnostics["curvature"]), 2), round(float(info.diagnostics["slope"]), 2)
        (2.0, 4.47)
        >>> tx = optax.chain(flatjax.crsam(loss_fn, rho=0.1), optax.sgd(0.05, momentum=0.9))   # Optax form
    """
    rho = guarded("rho", rho, low=0.0)
    alpha = guarded("alpha", alpha, low=0.0)
    beta = guarded("beta", beta, low=0.0)
    check_choice("form", form, FORMS)
    check_number("log_floor", log_floor, low=0.0, low_open=True)

    def direction(ctx: StepContext, method_state: PyTree) -> Direction:
        r, a, b = ctx.value(rho), ctx.value(alpha), ctx.value(beta)
        if ctx.clean_grad is not None:  # the code form needs g but not L0 (only the diagnostics do)
            loss0, aux0, g = jnp.asarray(NAN, ctx.dtype), None, ctx.clean_grad
        else:
            loss0, aux0, g = ctx.value_and_grad(ctx.params, ctx.batch)
        e = perturb.normalized_ascent(g, r)  # ρ v
        plus, minus = Shifted(ctx.params, e), Shifted(ctx.params, e, -1.0)
        folded = form == "code" and ctx.sequential()
        if folded:
            # α, β are known before the passes: (1 + α + β)∇L+ − 2αg is formed and stored before the third
            # pass, which then holds one gradient-sized buffer besides its point instead of g and ∇L+ (stored:
            # XLA would otherwise compute only the elements the tie reads first, and the rest at the end)
            first = ctx.probes(points=[plus], batch=ctx.batch)
            grad_plus = index(first.grads, 0)
            partial = materialized(combine_partial, grad_plus, g, a, b, like=jax.tree.map(up, grad_plus))
            point, batch = ctx.after(minus, ctx.batch, partial)
            second = ctx.probes(points=[point], batch=batch)
            (lp,), (lm,) = first.losses, second.losses
            d = combine_rest(partial, index(second.grads, 0), a, b)
        else:
            out = ctx.probes(points=[plus, minus], batch=ctx.batch)
            (lp, lm), gp, gm = out.losses, index(out.grads, 0), index(out.grads, 1)
        c, s = lp + lm - 2.0 * loss0, lp - lm
        if not folded:
            if form == "code":
                wc, ws = a, b
            else:  # d/dw of α log max(c, floor): α/c where c > floor, 0 where clamped
                wc = jnp.where(c > log_floor, a / jnp.maximum(c, log_floor), 0.0)
                ws = jnp.where(s > log_floor, b / jnp.maximum(s, log_floor), 0.0)
            d = combine(gp, gm, g, wc, ws)
        grad_norm = global_norm(g)
        safe_r2 = jnp.maximum(r * r, 1e-30)
        diagnostics = {
            "rho": r,
            "alpha": a,
            "beta": b,
            "grad_norm": grad_norm,
            "curvature": c / safe_r2,
            "slope": s / jnp.maximum(2.0 * r, 1e-30),
            "normalized_curvature": c / safe_r2 / (grad_norm + 1e-12),
            "regularizer": a * jnp.log(jnp.maximum(c, log_floor)) + b * jnp.log(jnp.maximum(s, log_floor)),
        }
        return Direction(d, method_state, loss0, aux0, jnp.stack([loss0, lp, lm]), diagnostics)

    return rule_estimator(
        name="crsam", loss_fn=loss_fn, direction=direction, init_method_state=lambda p: (), n_probes=3,
        diagnostics=("rho", "alpha", "beta", "grad_norm", "curvature", "slope", "normalized_curvature", "regularizer"),
        has_aux=has_aux, seed=0, strategy=strategy, axis_name=axis_name,
        reuse_gradient=form == "code",
        rejects_clean_grad=None if form == "code" else "the log form divides by the curvature, which needs L(w)",
        trainable=trainable,
    )
