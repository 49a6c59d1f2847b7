"""WP-SGD and NSO: gradients at randomly perturbed weights, one-sided or in antithetic ±U pairs.

Zhang, Li, Ju, "Noise Stability Optimization for Finding Flat Minima: A Hessian-based Regularization
Approach", TMLR 2024 (official code: VirtuosoResearch/Noise-stability-optimization). With
``U ~ N(0, σ² I)``: ``L(w+U) + L(w−U) = 2L(w) + UᵀHU + O(‖U‖⁴)``, so each antithetic pair cancels the
first-order term and NSO descends ``L + (σ²/2) Tr(H)`` with lower variance than one-sided WP-SGD.

Paper vs official code: the paper's algorithm averages the ± pairs only; the code adds the clean
gradient with weight ``λ`` (its ``nsm_lam``: 0.5 by default there, 0 in every provided script) and
always runs the clean pass, the only one that updates BatchNorm running statistics. flatjax's ``lam``
defaults to 0 (the paper) and skips the clean pass when nothing needs it. Details and defaults:
``docs/algorithms.md`` (WP-SGD and NSO).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flatjax.core import perturb
from flatjax.core.estimator import NAN, Direction, Estimator, StepContext, rule_estimator
from flatjax.core.evaluate import Shifted, Strategy, materialized
from flatjax.core.schedule import ScalarOrSchedule
from flatjax.core.tree import PyTree, add_scaled, cast_like, scale, weighted_sum
from flatjax.core.validate import check_choice, check_positive_int, guarded

#: Noise families: absolute-scale i.i.d. (the NSO code's options) or RWP's filter-wise Gaussian.
NOISES = perturb.NOISE_DISTRIBUTIONS + ("filterwise",)


def draw_noise(key: jax.Array, params: PyTree, sigma: jax.Array, noise: str) -> tuple[PyTree, jax.Array]:
    """One perturbation ``U`` and ``‖U‖``: ``σ z`` (z unit-variance i.i.d.) or filter-wise ``σ ‖w_f‖ z``."""
    if noise == "filterwise":
        u, norm = perturb.scaled_noise(key, params, perturb.filterwise_scales(params, sigma))
    else:
        u, norm = perturb.scaled_noise(key, params, jax.tree.map(lambda _: sigma, params), noise)
    return cast_like(u, params), norm


#: Above this many noise draws the probes are built and evaluated stacked, tracing one gradient pass
#: (compile time independent of k; the same noise values and update as the unrolled form).
UNROLL_MAX_K = 4


def perturbed_probes(ctx: StepContext, s: jax.Array, k: int, noise: str, signs: tuple[float, ...]):
    """Draw ``k`` noises ``U_i`` and evaluate every ``w + sign U_i`` (order: i-major, then signs).

    Returns ``(probes, ‖U_1‖)``.
    """
    keys = jax.random.split(ctx.key, k)
    if k <= UNROLL_MAX_K:
        # each U_i stored once with its norm (the chunked draw is dead before the passes), and the points
        # built where the strategy evaluates them (sequential: each once the previous pass is done)
        like = (ctx.params, jnp.zeros((), ctx.dtype))
        noises, norms = zip(*[materialized(draw_noise, kk, ctx.params, s, noise, like=like) for kk in keys])
        points = [Shifted(ctx.params, u, sign) for u in noises for sign in signs]
        return ctx.probes(points=points, batch=ctx.batch), norms[0]
    noises, norms = jax.vmap(lambda kk: draw_noise(kk, ctx.params, s, noise))(keys)  # leaves (k, ...)
    n = k * len(signs)

    def stacked(w, u):
        pts = jnp.stack([w[None] + sign * u for sign in signs], axis=1).astype(w.dtype)  # (k, signs, ...)
        return pts.reshape((n,) + jnp.shape(w))

    points = jax.tree.map(stacked, ctx.params, noises)
    return ctx.probes_stacked(points, ctx.batch), norms[0]


def _check_common(sigma, k, noise):
    """The checked ``sigma`` (see :func:`~flatjax.core.validate.guarded`)."""
    check_positive_int("k", k)
    check_choice("noise", noise, NOISES)
    return guarded("sigma", sigma, low=0.0)


def wpsgd(
    loss_fn: Callable[..., Any],
    sigma: ScalarOrSchedule = 0.01,
    *,
    k: int = 1,
    noise: str = "gaussian",
    seed: Any = 0,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    axis_name: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Weight-perturbed SGD / randomized smoothing: ``d = (1/k) Σ_i ∇L_B(w + U_i)``.

    The one-sided baseline of the NSO paper (Zhang et al., TMLR 2024). ``U_i = σ z_i`` at absolute scale
    on every leaf.

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      sigma: σ ≥ 0 (float or schedule).
      k: number of noise draws (≥ 1), evaluated together by the strategy.
      noise: 'gaussian', 'laplace' (Laplace(0, 1/√2)), 'uniform' (U(−√3, √3)) — unit variance before σ —
        or 'filterwise' (RWP's ``σ ‖w_f‖ z``).
      seed, has_aux, strategy, axis_name, trainable: as in :func:`rwp`.

    Reports: ``loss``/``aux`` from the first perturbed pass (there is no clean pass);
    ``probe_losses`` = [L(w + U_1), ..., L(w + U_k)]; diagnostics ``sigma``, ``noise_norm`` (‖U_1‖).
    A given ``clean_grad`` is ignored (the rule has no clean gradient).

    Example::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2)
        >>> est = flatjax.estimators.wpsgd(loss_fn, sigma=0.01, k=3, seed=0)
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch)
        >>> info.probe_losses.shape, sorted(info.diagnostics)   # k perturbed passes
        ((3,), ['noise_norm', 'sigma'])
        >>> bool(loss == info.probe_losses[0])                  # loss: the first perturbed pass
        True
        >>> tx = optax.chain(flatjax.wpsgd(loss_fn, sigma=0.01, k=3), optax.sgd(0.1, momentum=0.9))
    """
    sigma = _check_common(sigma, k, noise)

    def direction(ctx: StepContext, method_state: PyTree) -> Direction:
        s = ctx.value(sigma)
        out, noise_norm = perturbed_probes(ctx, s, k, noise, (1.0,))
        d = weighted_sum(out.grads, jnp.full((k,), 1.0 / k))
        aux = jax.tree.map(lambda x: x[0], out.aux)
        diagnostics = {"sigma": s, "noise_norm": noise_norm}
        return Direction(d, method_state, out.losses[0], aux, out.losses, diagnostics)

    return rule_estimator(
        name="wpsgd", loss_fn=loss_fn, direction=direction, init_method_state=lambda p: (), n_probes=k,
        diagnostics=("sigma", "noise_norm"), has_aux=has_aux, seed=seed,
        strategy=strategy, axis_name=axis_name, reuse_gradient=False, trainable=trainable,
    )


def nso(
    loss_fn: Callable[..., Any],
    sigma: ScalarOrSchedule = 0.01,
    lam: ScalarOrSchedule = 0.0,
    *,
    k: int = 1,
    noise: str = "gaussian",
    seed: Any = 0,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    axis_name: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Noise Stability Optimization (Zhang et al., TMLR 2024), two-point antithetic form.

    ``d = λ ∇L_B(w) + (1 − λ)/(2k) Σ_i [∇L_B(w + U_i) + ∇L_B(w − U_i)]`` with the SAME ``U_i`` in each
    ± pair and one batch for every pass; ``U_i = σ z_i`` at absolute scale on every leaf. The paper's
    algorithm is λ = 0; λ is the official code's ``nsm_lam`` (0.5 by default there, 0 in its scripts).

    The clean pass at ``w`` is evaluated only when it is needed: when ``has_aux`` (its aux — e.g.
    BatchNorm statistics — is the one reported, as in the official code where only the clean pass
    updates running statistics) or when ``lam`` is not the literal 0 (a schedule or an array, as under
    ``inject_hyperparams``, counts as needed). So the default costs 2k passes, like the paper's count;
    with ``has_aux`` and λ = 0 the clean pass is a forward pass only (its loss and aux, no gradient).

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      sigma: σ ≥ 0 (0.01 in the paper's CIFAR scripts; 0.005–0.014 elsewhere).
      lam: 0 ≤ λ ≤ 1, weight of the clean gradient (0).
      k: number of antithetic pairs (≥ 1; the scripts sweep 1–4); the 2k passes are independent.
      noise, seed, has_aux, strategy, axis_name, trainable: as in :func:`wpsgd`.

    Reports: ``loss``/``aux`` from the clean pass (NaN loss / previous aux when it is skipped);
    ``probe_losses`` = [L(w), L(w + U_1), L(w − U_1), ..., L(w − U_k)] (L(w) NaN when skipped);
    diagnostics ``sigma``, ``noise_norm`` (‖U_1‖), ``lam``, ``pair_curvature`` (mean of
    L(w+U) + L(w−U) − 2L(w) over pairs ≈ UᵀHU; NaN without the clean pass). A given ``clean_grad`` is
    ignored (the clean pass also yields L(w) and the aux).

    Example (on a quadratic the ± pair cancels the noise: the direction is the clean gradient)::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2)
        >>> est = flatjax.estimators.nso(loss_fn, sigma=0.01, k=1)      # λ = 0: no clean pass
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch)
        >>> bool(jnp.isnan(loss)), info.probe_losses.shape             # [L(w) = NaN, L(w + U), L(w − U)]
        (True, (3,))
        >>> [round(float(x), 4) for x in grads["x"]]
        [2.0, 4.0]
        >>> est = flatjax.estimators.nso(loss_fn, sigma=0.01, lam=0.5, k=2)   # λ > 0: clean pass too
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch)
        >>> round(float(loss), 4), info.probe_losses.shape
        (5.0, (5,))
        >>> tx = optax.chain(flatjax.nso(loss_fn, sigma=0.01, k=1), optax.sgd(0.1, momentum=0.9))
    """
    sigma = _check_common(sigma, k, noise)
    lam = guarded("lam", lam, low=0.0, high=1.0)
    clean_grad_needed = not (isinstance(lam, (int, float)) and lam == 0)
    clean_pass = has_aux or clean_grad_needed

    def direction(ctx: StepContext, method_state: PyTree) -> Direction:
        s, lam_t = ctx.value(sigma), ctx.value(lam)
        # the 2k perturbed passes form the probe set (an even count: splits over device pairs)
        out, noise_norm = perturbed_probes(ctx, s, k, noise, (1.0, -1.0))
        d = weighted_sum(out.grads, jnp.full((2 * k,), 1.0 / (2 * k)))
        if clean_pass:  # after d (not the 2k gradients): one parameter-sized buffer held through it
            clean_params, clean_batch = ctx.after(ctx.params, ctx.batch, d)
            if clean_grad_needed:
                loss0, aux0, g0 = ctx.value_and_grad(clean_params, clean_batch)
                d = add_scaled(scale(d, 1.0 - lam_t), g0, lam_t)
            else:  # λ = 0: only its loss and aux are reported, a forward pass is enough
                loss0, aux0 = ctx.loss_and_aux(clean_params, clean_batch)
            curvature = jnp.mean(out.losses[0::2] + out.losses[1::2] - 2.0 * loss0)
        else:
            loss0, aux0, curvature = jnp.asarray(NAN, ctx.dtype), None, jnp.asarray(NAN, ctx.dtype)
        diagnostics = {"sigma": s, "noise_norm": noise_norm, "lam": lam_t,
                       "pair_curvature": curvature}
        losses = jnp.concatenate([jnp.stack([loss0]), out.losses])
        return Direction(d, method_state, loss0, aux0, losses, diagnostics)

    return rule_estimator(
        name="nso", loss_fn=loss_fn, direction=direction, init_method_state=lambda p: (), n_probes=2 * k + 1,
        diagnostics=("sigma", "noise_norm", "lam", "pair_curvature"), has_aux=has_aux,
        seed=seed, strategy=strategy, axis_name=axis_name, reuse_gradient=False, trainable=trainable,
    )
