"""Random weight perturbation: RWP, ARWP, m-RWP, m-ARWP.

Li, Xie, Huang, Yang, "Revisiting Random Weight Perturbation for Efficiently Improving
Generalization", TMLR 2024 (official code: nblt/mARWP). Noise is filter-wise
Gaussian ``e_f = σ ‖w_f‖ z`` (filter = last axis of a Flax kernel; 1-D leaves as a whole), ARWP divides
it by ``sqrt(1 + η F_f)`` with ``F_f`` the per-filter sum of the squared-gradient history
``s ← β s + g_pert²``. m-RWP mixes a clean and a perturbed gradient, two INDEPENDENT passes that any
probe strategy can evaluate together (on two device groups: SGD-like critical path).

Where the paper and the official code differ, flatjax follows the code: the noise std (not its
variance) is divided by ``sqrt(1 + η F_f)``, the history has no (1−β) factor, and m-ARWP's official
script uses two consecutive mini-batches per update and an epoch-wise cosine learning rate over doubled
epochs. Details: ``docs/algorithms.md`` (RWP family).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from flatjax.core import perturb
from flatjax.core.estimator import NAN, Direction, Estimator, StepContext, rule_estimator
from flatjax.core.evaluate import Strategy, materialized
from flatjax.core.schedule import ScalarOrSchedule
from flatjax.core.tree import PyTree, add_scaled, compute_dtype, index, up
from flatjax.core.validate import guarded


def _require(name: str, **values: Any) -> None:
    """``None`` would silently select another variant (e.g. ``arwp(eta=None)`` is RWP): raise instead."""
    for arg, value in values.items():
        if value is None:
            raise ValueError(f"{name}: {arg} must be a number or a schedule, got None (it selects the variant: "
                             f"use flatjax.rwp / mrwp / arwp for the method without it)")


def _rwp_estimator(
    name: str,
    loss_fn: Callable[..., Any],
    sigma: ScalarOrSchedule,
    lam: ScalarOrSchedule | None,
    eta: ScalarOrSchedule | None,
    beta: ScalarOrSchedule | None,
    *,
    seed: Any,
    has_aux: bool,
    strategy: Strategy,
    axis_name: str | None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None,
) -> Estimator:
    """Shared rule: ``lam is None`` → one perturbed pass; ``eta is None`` → no gradient history."""
    sigma = guarded("sigma", sigma, low=0.0)
    adaptive = eta is not None
    mixed = lam is not None
    if mixed:
        lam = guarded("lam", lam, low=0.0, high=1.0)
    if adaptive:
        eta = guarded("eta", eta, low=0.0)
        beta = guarded("beta", beta, low=0.0, high=1.0, low_open=True, high_open=True)

    def init_method_state(params):
        if not adaptive:
            return ()
        dtype = compute_dtype(params)
        return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params)

    def direction(ctx: StepContext, history: PyTree) -> Direction:
        s = ctx.value(sigma)
        accumulator, eta_t = (history, ctx.value(eta)) if adaptive else (None, 0.0)

        def point_and_noise_norm(params):
            e, norm = perturb.scaled_noise(ctx.key, params, perturb.filterwise_scales(params, s, accumulator, eta_t))
            return add_scaled(params, e), norm

        # stored once, so the noise is dead before the pass (memory) and its consumers stay plain (compile)
        perturbed, noise_norm = materialized(point_and_noise_norm, ctx.params,
                                             like=(ctx.params, jnp.zeros((), ctx.dtype)))
        diagnostics = {"sigma": s, "noise_norm": noise_norm}
        if not mixed:
            loss1, aux1, g1 = ctx.value_and_grad(perturbed, ctx.batch)
            d, loss, aux, losses = g1, loss1, aux1, jnp.stack([loss1])
        else:
            lam_t = ctx.value(lam)
            if ctx.clean_grad is not None:
                loss0, aux0, g0 = jnp.asarray(NAN, ctx.dtype), None, ctx.clean_grad
                loss1, _, g1 = ctx.value_and_grad(perturbed, ctx.perturbed_batch)
            else:  # the two passes are independent: evaluated together by the strategy, the perturbed one
                # first (run one after another, its point is then dead before the clean gradient exists)
                out = ctx.probes(points=[perturbed, ctx.params], batches=[ctx.perturbed_batch, ctx.batch])
                (loss1, loss0), aux0 = out.losses, index(out.aux, 1)
                g1, g0 = index(out.grads, 0), index(out.grads, 1)
            d = jax.tree.map(
                lambda a, b: ((1.0 - lam_t) * up(a) + lam_t * up(b)).astype(a.dtype),
                g0,
                g1,
            )
            loss, aux, losses = loss0, aux0, jnp.stack([loss0, loss1])
            diagnostics["lam"] = lam_t
        if adaptive:
            history = perturb.accumulate_squares(history, g1, ctx.value(beta))
        return Direction(d, history, loss, aux, losses, diagnostics)

    return rule_estimator(
        name=name,
        loss_fn=loss_fn,
        direction=direction,
        init_method_state=init_method_state,
        n_probes=2 if mixed else 1,
        diagnostics=("sigma", "noise_norm") + (("lam",) if mixed else ()),
        has_aux=has_aux,
        seed=seed,
        strategy=strategy,
        axis_name=axis_name,
        reuse_gradient=mixed,
        trainable=trainable,
    )


def rwp(
    loss_fn: Callable[..., Any],
    sigma: ScalarOrSchedule = 0.01,
    *,
    seed: Any = 0,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    axis_name: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Random Weight Perturbation (Li et al., TMLR 2024): ``d = ∇L_B(w + e)``, filter-wise Gaussian e.

    One pass per step, like SGD. ``e_f = σ ‖w_f‖ z`` per output filter (the last axis of a kernel with
    ndim > 1, its norm over the other axes); a leaf with ndim ≤ 1 is one filter: ``σ(‖p‖ + 1e-16) z``.

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      sigma: σ ≥ 0, float or schedule (0.01). The official ARWP script rises from 0.001 to 0.011:
        ``flatjax.cosine_increasing(0.001, 10, T)`` with T the total number of updates.
      seed: int seed or PRNG key of the noise stream (step t uses ``fold_in(key, t)``).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      strategy: 'auto', 'sequential', 'vmap' or ``flatjax.ShardMapProbes(mesh, axis)``.
      axis_name: data-parallel axis of an enclosing ``shard_map`` (gradients averaged over it; every
        device draws the same noise, so the update equals one device on the whole batch).
      trainable: None (all), or a pytree of bools like params (or ``params -> tree``): False leaves are
        frozen — neither perturbed nor counted in norms/noise — and get a zero direction.

    Reports: ``loss``/``aux`` from the perturbed pass (the only one); ``probe_losses`` = [L(w + e)];
    diagnostics ``sigma``, ``noise_norm`` (‖e‖). A given ``clean_grad`` is ignored (no clean gradient
    in the rule).

    Example::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2)
        >>> est = flatjax.estimators.rwp(loss_fn, sigma=0.01, seed=0)
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch)
        >>> info.probe_losses.shape, sorted(info.diagnostics)          # one perturbed pass
        ((1,), ['noise_norm', 'sigma'])
        >>> again = est.value_and_grad(params, est.init(params), batch)[1]   # same seed and step
        >>> bool(jnp.array_equal(grads["x"], again["x"]))                    # same noise, same direction
        True
        >>> sigma = flatjax.cosine_increasing(0.001, 10, total_steps=1000)
        >>> tx = optax.chain(flatjax.rwp(loss_fn, sigma=sigma), optax.sgd(0.1, momentum=0.9))   # Optax form
    """
    return _rwp_estimator(
        "rwp", loss_fn, sigma, None, None, None, seed=seed, has_aux=has_aux,
        strategy=strategy, axis_name=axis_name, trainable=trainable,
    )


def arwp(
    loss_fn: Callable[..., Any],
    sigma: ScalarOrSchedule = 0.01,
    eta: ScalarOrSchedule = 0.1,
    beta: ScalarOrSchedule = 0.99,
    *,
    seed: Any = 0,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    axis_name: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Adaptive RWP (Li et al., TMLR 2024): RWP with noise ``/ sqrt(1 + η F_f)``.

    ``e_f = σ ‖w_f‖ z / sqrt(1 + η F_f)``, ``d = ∇L_B(w + e)``; after the step ``s ← β s + g_pert²`` per
    element, with ``g_pert`` the raw gradient at the perturbed point (no (1−β) factor, as in the
    official code), and ``F_f`` the per-filter SUM of ``s`` (per element for leaves with ndim ≤ 1). The
    first step uses ``s = 0`` (no scaling). η = 0 gives RWP. The official code divides the noise's
    standard deviation by ``sqrt(1 + η F_f)``; the paper's formula divides its variance (see
    ``docs/algorithms.md``); flatjax follows the code.

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      sigma: σ ≥ 0 (float or schedule; 0.01).
      eta: η ≥ 0 (0.1 in the official scripts).
      beta: 0 < β < 1 (0.99 in the official scripts).
      seed, has_aux, strategy, axis_name, trainable: as in :func:`rwp`.

    Reports as :func:`rwp`. State: the history ``s`` (one copy of the parameters, in the arithmetic dtype).

    Example::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2)
        >>> est = flatjax.estimators.arwp(loss_fn, sigma=0.01, eta=0.1, beta=0.99)
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch)
        >>> bool(jnp.allclose(est_state.method["x"], grads["x"] ** 2))   # s = β·0 + g_pert² after step 1
        True
        >>> tx = optax.chain(flatjax.arwp(loss_fn, sigma=0.01), optax.sgd(0.1, momentum=0.9))   # Optax form
    """
    _require("arwp", eta=eta, beta=beta)
    return _rwp_estimator(
        "arwp", loss_fn, sigma, None, eta, beta, seed=seed, has_aux=has_aux,
        strategy=strategy, axis_name=axis_name, trainable=trainable,
    )


def mrwp(
    loss_fn: Callable[..., Any],
    sigma: ScalarOrSchedule = 0.015,
    lam: ScalarOrSchedule = 0.5,
    *,
    seed: Any = 0,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    axis_name: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Mixed RWP (Li et al., TMLR 2024): ``d = λ ∇L_{B1}(w + e) + (1 − λ) ∇L_{B0}(w)``.

    ``e`` is RWP's filter-wise noise. The clean pass runs on ``batch`` (B0), the perturbed pass on
    ``perturbed_batch`` (B1; the official m-ARWP uses the next mini-batch, so one update reads two) or on
    ``batch`` when it is not given. The passes are independent:
    ``strategy=ShardMapProbes(mesh, 'probe')`` with a probe axis of size 2 runs them on two device groups.

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      sigma: σ ≥ 0 (0.015 in the paper's CIFAR runs).
      lam: 0 ≤ λ ≤ 1 (0.5). λ = 0 gives the base optimizer on the clean gradient, λ = 1 RWP on B1.
      seed, has_aux, strategy, axis_name, trainable: as in :func:`rwp`.

    Reports: ``loss``/``aux`` from the clean pass on B0; ``probe_losses`` = [L_B0(w), L_B1(w + e)];
    diagnostics ``sigma``, ``noise_norm``, ``lam``. A given ``clean_grad`` (on B0) replaces the
    clean pass (loss NaN, aux None).

    Example::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch, next_batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2), jnp.ones(2)
        >>> est = flatjax.estimators.mrwp(loss_fn, sigma=0.015, lam=0.5)
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch,
        ...                                                   perturbed_batch=next_batch)
        >>> round(float(loss), 4), info.probe_losses.shape   # loss of the clean pass on B0
        (5.0, (2,))
        >>> sorted(info.diagnostics)
        ['lam', 'noise_norm', 'sigma']
        >>> tx = optax.chain(flatjax.mrwp(loss_fn, sigma=0.015, lam=0.5), optax.sgd(0.1, momentum=0.9))
    """
    _require("mrwp", lam=lam)
    return _rwp_estimator(
        "mrwp", loss_fn, sigma, lam, None, None, seed=seed, has_aux=has_aux,
        strategy=strategy, axis_name=axis_name, trainable=trainable,
    )


def marwp(
    loss_fn: Callable[..., Any],
    sigma: ScalarOrSchedule = 0.015,
    lam: ScalarOrSchedule = 0.5,
    eta: ScalarOrSchedule = 0.1,
    beta: ScalarOrSchedule = 0.99,
    *,
    seed: Any = 0,
    has_aux: bool = False,
    strategy: Strategy = "auto",
    axis_name: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> Estimator:
    """Mixed adaptive RWP (Li et al., TMLR 2024): m-RWP with ARWP's history-scaled noise.

    ``d = λ ∇L_{B1}(w + e) + (1 − λ) ∇L_{B0}(w)`` with ``e_f = σ ‖w_f‖ z / sqrt(1 + η F_f)`` as in
    :func:`arwp`; only the perturbed gradient enters the history ``s``. Defaults of the official m-ARWP
    script: σ = 0.015 (constant), λ = 0.5, η = 0.1, β = 0.99. That script also feeds two consecutive
    mini-batches per update (pass the second as ``perturbed_batch``), doubles the epoch count to keep the
    number of updates, and decays the learning rate by an epoch-wise cosine (``docs/algorithms.md``).

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      sigma: σ ≥ 0.
      lam: 0 ≤ λ ≤ 1.
      eta: η ≥ 0.
      beta: 0 < β < 1.
      seed, has_aux, strategy, axis_name, trainable: as in :func:`rwp`.

    Reports as :func:`mrwp`. State: the history ``s``, as in :func:`arwp`.

    Example::

        >>> import jax, jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch, next_batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2), jnp.ones(2)
        >>> est = flatjax.estimators.marwp(loss_fn, sigma=0.015, lam=0.5, eta=0.1, beta=0.99)
        >>> loss, grads, est_state, info = est.value_and_grad(params, est.init(params), batch,
        ...                                                   perturbed_batch=next_batch)
        >>> round(float(loss), 4), [round(float(x), 4) for x in info.probe_losses][:1]   # L_B0(w)
        (5.0, [5.0])
        >>> jax.tree.map(jnp.shape, est_state.method)                # the history s, like params
        {'x': (2,)}
        >>> tx = optax.chain(flatjax.marwp(loss_fn, sigma=0.015, lam=0.5), optax.sgd(0.1, momentum=0.9))
    """
    _require("marwp", lam=lam, eta=eta, beta=beta)
    return _rwp_estimator(
        "marwp", loss_fn, sigma, lam, eta, beta, seed=seed, has_aux=has_aux,
        strategy=strategy, axis_name=axis_name, trainable=trainable,
    )
