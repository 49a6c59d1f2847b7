"""LETS: learn the perturbation radius ρ of a SAM-family method by bilevel optimization.

Wang, Jiang, Fu, Zhang, "LETS: Learning the Perturbation Radius for Sharpness-Aware Minimization",
ECML-PKDD 2024, arXiv 2408.08222. **No official code was found**, and the paper does not spell out its
hypergradient in a form we could check, so this module implements the derivation below (exact for the
one-step unrolled lower level), generalised to any Optax base optimizer. Summary and settings:
``docs/algorithms.md`` (LETS).

One update, training batch B and validation batch V (the paper samples V from the training set)::

    ρ = exp(α)                                    # α: the learned log-radius (float32 scalar)
    g = ∇L_B(w);  v = de/dρ                        # SAM: g/(‖g‖+ξ);  ASAM: T²g/(‖Tg‖+ξ)
    d(ρ) = inner direction at radius ρ            # SAM/ASAM: ∇L_B(w + ρv);  CR-SAM: see below
    (u, base_state') = base.update(d(ρ), base_state, w);   w' = w + u          # lower level
    gap = L_V(w') − L_B(w');   F = gap² / 2                                      # upper level
    dF/dρ = gap · ⟨∇L_V(w') − ∇L_B(w'),  J_u · dd/dρ⟩,   dF/dα = ρ · dF/dρ
    α ← α + radius_optimizer.update(dF/dα)       # default: Adam, lr 1e-4, exponential decay

* ``v`` does not depend on ρ (it is built from the clean gradient g), so the chain rule goes only
  through the gradient(s) at the perturbed point(s): for SAM/ASAM ``dd/dρ = H_B(w + ρv) v``.
* ``J_u`` is the Jacobian of the base optimizer's update with respect to its input direction, applied
  with ``jax.jvp(lambda x: base.update(x, base_state, w)[0], (d,), (dd/dρ,))``: exact and cheap
  (element-wise) for ANY Optax base. For SGD it is −γ (γ the current learning rate), and momentum and
  coupled weight decay add terms that do not depend on ρ, so the SGD form
  ``dF/dρ = −γ · gap · ⟨∇L_V(w') − ∇L_B(w'), H_B(w + e) v⟩`` is a special case.
  For Adam it is the true one-step Jacobian, which also differentiates the second moment ν̂ with
  respect to d (multiplying the SGD form by Adam's current preconditioner instead freezes ν̂; the two
  agree once ``(1 − β₂)/(1 − β₂ᵗ)`` is small, but on Adam's FIRST step the exact Jacobian nearly
  vanishes, since ``u₁ ≈ −lr · sign(d)``).
* The one-step unrolled lower level makes the hypergradient exact for that one step ("iterative
  differentiation" through one step, as the paper's alternating algorithm does).

Hypergradient modes (``hypergradient=``), all in one jitted step:

* ``"fd"`` (default): central finite difference of the direction map in ρ,
  ``dd/dρ ≈ (d(ρ + r) − d(ρ − r)) / (2r)``; for SAM/ASAM this is exactly
  ``(∇L_B(w+e+rv) − ∇L_B(w+e−rv)) / (2r)``. The step is ``r = fd_step / ‖v‖``, so the probe points
  move by ``fd_step`` in parameter space (DARTS' convention, Liu et al. 2019: 0.01). Why 1e-2: the
  truncation error is O(r²) (about 1e-4 relative for smooth losses), while float32 round-off in the
  gradient difference grows like ε₃₂‖∇L‖/r (≈1e-5 relative at r = 1e-2, ≈1e-3 at r = 1e-4). Two
  extra gradient passes per inner point. Measured on the test MLP (float32, hypergradient dF/dα
  against ``"exact"``): 5e-5–1e-4 relative at fd_step = 1e-2, 2e-4–8e-4 at 3e-2, up to 3e-3 at 1e-4.
* ``"fd_forward"``: one-sided ``(d(ρ + r) − d(ρ)) / r``: one extra pass per inner point, O(r) error
  (default fd_step = 1e-3, near the float32 optimum √ε₃₂ scale: 0.07–0.2 % relative on the test MLP;
  1.3 % at 1e-2).
  The paper says the Hessian "can be approximated by a first-order derivative" following Bottou,
  Curtis & Nocedal (2018) and Khan et al. (2018); this one-sided form is one reading of that.
* ``"exact"``: forward-over-reverse ``jax.jvp`` of the direction map in ρ (for SAM:
  ``jax.jvp(∇L_B, (w+e,), (v,))``); the primal output is the direction itself, so no separate pass.
* ``"exact_total"``: a check mode: forward mode through the WHOLE one-step map α ↦ F (inner
  direction, base update, both losses at w'). Must agree with ``"exact"`` to float rounding.
* ``"diag"``: Gauss–Newton/empirical-Fisher diagonal ``H(p) v ≈ ∇L_B(p) ⊙ ∇L_B(p) ⊙ v`` at each inner
  point p (no extra pass). A cheap hypothesis (a third-party summary says the paper uses a "diagonal
  Hessian approximation"): it uses the squared MINI-BATCH mean gradient, which underestimates the
  Fisher diagonal in scale (by about the batch size) — with Adam on α only its sign pattern matters.

Inner methods (``inner=``):

* ``"sam"``: ``e = ρ g/(‖g‖+ξ)``, ``d = ∇L_B(w+e)`` (identical to :func:`flatjax.sam`).
* ``"asam"``: ``e = ρ T²g/(‖Tg‖+ξ)``, ``T = |w| + η`` on ``mask`` leaves (as :func:`flatjax.asam`).
* ``"crsam"``: CR-SAM's released-code form (:func:`flatjax.crsam` with ``form="code"``):
  ``d = ∇L+ + a(∇L+ + ∇L− − 2g) + b(∇L+ − ∇L−)``, ``∇L± = ∇L_B(w ± ρv)``, ``v = g/(‖g‖+ξ)``
  (a, b = ``crsam_alpha``, ``crsam_beta``). In CR-SAM ρ is both SAM's radius and the
  finite-difference step of the curvature/slope estimates, so LETS learns the two together:
  ``dd/dρ = (1+a+b) H(w+ρv) v − (a−b) H(w−ρv) v`` (the chain rule goes through both probe points).
  CR-SAM's ``form="log"`` is not offered: there ρ also enters through the divisions by the
  finite-difference curvature and slope.

Non-finite values: when the hypergradient or the new α is not finite (e.g. a NaN/Inf loss in the
validation batch), the RADIUS update is skipped: α and the radius-optimizer state are kept, and the
cumulative counter ``radius_skips`` (state and diagnostic) grows by one. The lower-level step does not
read the validation batch and is returned as computed, so a bad validation batch never stops training.
A non-finite TRAINING step (NaN updates) is returned as is: wrap the whole transformation in
:func:`flatjax.skip_nonfinite` to drop such steps (it keeps every state, α included).

Cost per step (gradient passes; SAM itself: 2): clean 1 + inner points (1; CR-SAM 2) + upper 2
(∇L_V(w'), ∇L_B(w')) + HVP: fd 2 per point, fd_forward 1, exact ≈ 1–2 (a jvp of a gradient), diag 0.
Passes are evaluated one after another (no probe strategy); ``axis_name`` gives data parallelism.
Measured (the repository's ``experiments/results/bench_lets.md``, CPU MLP 784-512-512-10): LETS-SAM /
SAM step time ≈ 2.9 (fd), 2.5 (fd_forward), 2.7 (exact), 2.0 (diag); LETS-ASAM / SAM about the same.

Open points: which Hessian approximation the paper used is not certain. Its text says the Hessian "can
be approximated by a first-order derivative", citing Bottou et al. (whose Hessian-free section uses a
one-sided gradient difference) and Khan et al. (a squared-gradient Hessian approximation), which
matches ``"fd_forward"`` or ``"diag"`` rather than the default central ``"fd"``; ``"exact"`` is the
reference the approximations are measured against and costs no more than central fd on the CPU
benchmark (2.7 vs 2.9 × SAM; within noise of each other on a loaded machine). The decay rate of the
radius learning rate is not given either (see :func:`lets_radius_optimizer`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flatjax.core import perturb
from flatjax.core.estimator import NAN, Estimator, Info
from flatjax.core.evaluate import Evaluator
from flatjax.core.schedule import ScalarOrSchedule, value_at
from flatjax.core.transform import (FlatState, StepInfo, aux_template_of, check_aux, check_not_masked,
                                    empty_info, updates_as_clean_grad)
from flatjax.core.tree import XI, PyTree, add_scaled, cast_like, compute_dtype, global_norm, merge, select, vdot
from flatjax.core.validate import (check_bool, check_callable, check_choice, check_data_parallel,
                                   check_extra_args, check_like_params, check_number, check_positive_int,
                                   check_range, check_state, guarded, raw_key, resolve_trainable)
from flatjax.methods.crsam import combine as crsam_combine
from flatjax.methods.sam import as_mask_fn

INNERS = ("sam", "asam", "crsam")
HYPERGRADIENTS = ("fd", "fd_forward", "exact", "exact_total", "diag")
#: Initial radius per inner method when ``rho=None`` (the papers' CIFAR-10 values).
DEFAULT_RHO = {"sam": 0.05, "asam": 0.5, "crsam": 0.1}
#: Parameter-space length of the finite-difference displacement per mode (see module docstring).
DEFAULT_FD_STEP = {"fd": 1e-2, "fd_forward": 1e-3}
DIAGNOSTICS = ("rho", "upper_loss", "gap", "hypergrad", "grad_norm", "radius_skips")


class LetsEstimatorState(NamedTuple):
    """State of the LETS estimator (:func:`flatjax.estimators.lets`).

    Attributes:
      count: int32, completed steps.
      log_rho: α, the learned log-radius (float32 scalar); the next step uses ρ = exp(α).
      radius_state: the radius optimizer's state (its params are α).
      radius_skips: int32, radius updates skipped so far because of non-finite values.
    """

    count: jax.Array
    log_rho: jax.Array
    radius_state: optax.OptState
    radius_skips: jax.Array


class LetsState(NamedTuple):
    """State of the Optax form :func:`flatjax.lets`.

    Attributes:
      log_rho: α, the learned log-radius (float32 scalar); the next step uses ρ = exp(α).
      radius_state: the radius optimizer's state (its params are α).
      base_state: the base optimizer's state.
      radius_skips: int32, radius updates skipped so far because of non-finite values.
      flat: a :class:`~flatjax.core.transform.FlatState` (step count and the last :class:`StepInfo`),
        so :func:`flatjax.step_info` works on this state.
    """

    log_rho: jax.Array
    radius_state: optax.OptState
    base_state: optax.OptState
    radius_skips: jax.Array
    flat: FlatState


def lets_radius_optimizer(
    learning_rate: float = 1e-4,
    *,
    decay_rate: float = 0.99,
    transition_steps: int = 391,
    b1: float = 0.9,
    b2: float = 0.999,
) -> optax.GradientTransformation:
    """The default radius optimizer: Adam on α with an exponentially decaying learning rate.

    The paper (Appendix E) uses Adam with initial learning rate 1e-4 and an "exponential" schedule for
    α in every experiment. Its decay rate and Adam's β's could not be read from the paper, so the
    decay is a documented guess: ×``decay_rate`` per ``transition_steps`` updates, continuously
    (default ×0.99 per 391 steps = one CIFAR epoch at batch 128, i.e. ×0.13 over 200 epochs).
    """
    check_range("learning_rate", learning_rate, low=0.0)
    check_range("decay_rate", decay_rate, low=0.0, high=1.0, low_open=True)
    check_positive_int("transition_steps", transition_steps)
    check_range("b1", b1, low=0.0, high=1.0, high_open=True)
    check_range("b2", b2, low=0.0, high=1.0, high_open=True)
    schedule = optax.exponential_decay(learning_rate, transition_steps, decay_rate)
    return optax.adam(schedule, b1=b1, b2=b2)


def _check_transformation(name: str, value: Any) -> None:
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise ValueError(
            f"{name} must be an Optax gradient transformation (with init and update), "
            f"got {type(value).__name__}"
        )


@dataclasses.dataclass(frozen=True)
class _Inner:
    """An inner SAM-family rule: probe points ``w + sign_i · e(ρ)`` and a direction combining them."""

    signs: tuple[float, ...]
    ascent: Callable[[PyTree, PyTree, jax.Array, dict], PyTree]  # e(g, w, ρ, hyper), linear in ρ
    combine: Callable[[list, PyTree, dict], PyTree]  # d(grads at the points, g, hyper)
    weights: Callable[[dict], tuple]  # a_i with d = Σ a_i ∇L(point_i) + (terms without ρ)


def _inner_rule(inner: str, eta, mask, crsam_alpha, crsam_beta) -> _Inner:
    if inner == "sam":
        return _Inner(
            signs=(1.0,),
            ascent=lambda g, w, rho, h: perturb.normalized_ascent(g, rho),
            combine=lambda grads, g, h: grads[0],
            weights=lambda h: (1.0,),
        )
    if inner == "asam":
        mask_of = as_mask_fn(mask)
        return _Inner(
            signs=(1.0,),
            ascent=lambda g, w, rho, h: perturb.adaptive_ascent(g, w, rho, h["eta"], mask_of(w)),
            combine=lambda grads, g, h: grads[0],
            weights=lambda h: (1.0,),
        )

    return _Inner(  # CR-SAM's code form, combined exactly as flatjax.crsam does
        signs=(1.0, -1.0),
        ascent=lambda g, w, rho, h: perturb.normalized_ascent(g, rho),
        combine=lambda grads, g, h: crsam_combine(grads[0], grads[1], g, h["crsam_alpha"], h["crsam_beta"]),
        weights=lambda h: (1.0 + h["crsam_alpha"] + h["crsam_beta"], h["crsam_alpha"] - h["crsam_beta"]),
    )


def _sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(lambda x, y: x.astype(jnp.float32) - y.astype(jnp.float32), a, b)


@dataclasses.dataclass(frozen=True)
class LetsEstimator(Estimator):
    """The LETS estimator; ``base_optimizer`` is the lower-level optimizer its lookahead step uses."""

    base_optimizer: optax.GradientTransformationExtraArgs


def lets(
    loss_fn: Callable[..., Any],
    base_optimizer: optax.GradientTransformation,
    *,
    inner: str = "sam",
    rho: float | None = None,
    eta: ScalarOrSchedule = 0.01,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    crsam_alpha: ScalarOrSchedule = 0.1,
    crsam_beta: ScalarOrSchedule = 0.01,
    radius_optimizer: optax.GradientTransformation | None = None,
    hypergradient: str = "fd",
    fd_step: float | None = None,
    radius_every: int = 1,
    has_aux: bool = False,
    axis_name: str | None = None,
    trainable: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> LetsEstimator:
    """LETS (Wang et al., ECML-PKDD 2024): a SAM-family direction whose log-radius α is learned on the fly.

    The upper level needs the parameters AFTER the lower-level step, so LETS knows your base optimizer.
    Estimator form (your loop applies the direction with the SAME base optimizer)::

        est = flatjax.estimators.lets(loss_fn, optimizer, inner="sam", rho=0.05)
        est_state = est.init(params)
        loss, grads, est_state, info = est.value_and_grad(params, est_state, batch, val_batch=val_batch,
                                                          base_state=opt_state)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        rho_now = jnp.exp(est_state.log_rho)

    (a runnable example closes this docstring).

    ``value_and_grad(params, state, batch, *, val_batch, base_state, loss_kwargs=None, clean_grad=None)``:
    ``val_batch`` is required (the paper samples it from the TRAINING set, a different mini-batch from
    ``batch``); ``base_state`` is your base optimizer's current state (with Flax NNX:
    ``nnx.as_pure(optimizer.opt_state)``); ``loss_kwargs`` are used for every pass; ``clean_grad`` (your
    ∇L_B(w); the device average under ``axis_name``) replaces the clean pass (loss = NaN, aux = None).
    The returned direction is the inner method's at the radius this step used (``info.diagnostics["rho"]``).

    Optax form ``flatjax.lets(loss_fn, base_optimizer, ...)``: the transformation CONTAINS the base
    optimizer, so its updates are the full parameter updates (do not chain another optimizer after it);
    ``tx.update(None, state, params, batch=batch, val_batch=val_batch)``.

    With a radius learning rate of 0 the step equals ``optax.chain(flatjax.sam(loss_fn, exp(α₀)),
    base_optimizer)`` (``asam``/``crsam`` likewise). See the module docstring for the math, the
    hypergradient modes, and the non-finite handling (the radius update is SKIPPED, never raised).

    Args:
      loss_fn: ``loss_fn(params, batch, **loss_kwargs) -> loss`` or ``(loss, aux)``.
      base_optimizer: the lower-level Optax optimizer (e.g. ``optax.sgd(0.1, momentum=0.9)`` with
        weight decay chained before it); any Optax transformation, schedules included.
      inner: ``"sam"`` (LETS-SAM), ``"asam"`` (LETS-ASAM) or ``"crsam"`` (CR-SAM's code form).
      rho: initial radius ρ₀ > 0 (α₀ = log ρ₀ in float32); None: 0.05 (sam), 0.5 (asam), 0.1 (crsam).
        The paper reports LETS to be robust to this choice (its Table 5).
      eta: ASAM's η ≥ 0 in ``T = |w| + η`` (0.01).
      mask: ASAM's adaptive leaves (pytree of bools or ``params -> mask``; None: kernels/scales/embeddings).
      crsam_alpha, crsam_beta: CR-SAM's curvature and slope weights ≥ 0 (its α, β: 0.1, 0.01).
      radius_optimizer: Optax transformation for α (minimizes F); None: :func:`lets_radius_optimizer`
        (Adam, lr 1e-4, exponential decay).
      hypergradient: ``"fd"``, ``"fd_forward"``, ``"exact"``, ``"exact_total"`` or ``"diag"``.
      fd_step: in [1e-6, 1], parameter-space length of the finite-difference displacement (r = fd_step/‖v‖);
        None: 1e-2 for ``"fd"``, 1e-3 for ``"fd_forward"`` (unused by the other modes).
      radius_every: K ≥ 1: update the radius on every K-th step only (steps 0, K, 2K, ...); the other steps
        cost what the inner method costs (SAM: 2 passes) and report NaN upper-level diagnostics. 1 (the
        paper's per-step update) is the default; K = 4 brings LETS-SAM's average cost to 1.5x SAM's
        (``experiments/results/bench_lets.md``: cost and learned-ρ trajectory per K).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is reported from the clean pass.
      axis_name: data-parallel axis of an enclosing ``shard_map``/``pmap``: every loss and gradient (hence
        the hypergradient and α) is averaged over it.
      trainable: None (all), or a pytree of bools like params (or ``params -> tree``): False leaves are frozen —
        not perturbed, not in ‖g‖ — and get a zero direction (the base optimizer still sees them).

    Reports: ``loss``/``aux`` of the clean pass; ``probe_losses`` = [L_B(w), L_B(w+e) (CR-SAM: and
    L_B(w−e)), L_V(w'), L_B(w')]; diagnostics ``rho`` (the ρ this step used), ``upper_loss``
    (F = gap²/2), ``gap`` (L_V(w') − L_B(w')), ``hypergrad`` (dF/dα), ``grad_norm`` (‖g‖) and
    ``radius_skips`` (cumulative skipped radius updates).

    Example::

        >>> import jax.numpy as jnp, optax, flatjax
        >>> loss_fn = lambda w, batch: jnp.sum((w["x"] - batch) ** 2)
        >>> params, batch, val_batch = {"x": jnp.array([1.0, 2.0])}, jnp.zeros(2), jnp.ones(2)
        >>> optimizer = optax.sgd(0.1)
        >>> est = flatjax.estimators.lets(loss_fn, optimizer, inner="sam", rho=0.05)
        >>> loss, grads, est_state, info = est.value_and_grad(
        ...     params, est.init(params), batch, val_batch=val_batch, base_state=optimizer.init(params))
        >>> round(float(loss), 4), round(float(info.diagnostics["rho"]), 4)   # clean loss, the ρ used
        (5.0, 0.05)
        >>> info.probe_losses.shape                     # [L_B(w), L_B(w + e), L_V(w'), L_B(w')]
        (4,)
        >>> bool(est_state.log_rho != jnp.log(0.05))    # α moved: the next step uses another ρ
        True
        >>> tx = flatjax.lets(loss_fn, optax.sgd(0.1), inner="sam", rho=0.05)   # Optax form: final updates
        >>> updates, tx_state = tx.update(None, tx.init(params), params, batch=batch, val_batch=val_batch)
    """
    check_callable("loss_fn", loss_fn)
    check_bool("has_aux", has_aux)
    _check_transformation("base_optimizer", base_optimizer)
    check_choice("inner", inner, INNERS)
    check_choice("hypergradient", hypergradient, HYPERGRADIENTS)
    if rho is None:
        rho = DEFAULT_RHO[inner]
    if callable(rho):
        raise ValueError("rho is the INITIAL radius (a positive number); LETS learns it, so no schedule")
    check_number("rho", rho, low=0.0, low_open=True)
    if fd_step is None:
        fd_step = DEFAULT_FD_STEP.get(hypergradient, 1e-2)
    # below 1e-6 float32 round-off cancels the gradient difference (a zero hypergradient: ρ frozen)
    check_number("fd_step", fd_step, low=1e-6, high=1.0)
    check_positive_int("radius_every", radius_every)
    eta = guarded("eta", eta, low=0.0)
    crsam_alpha = guarded("crsam_alpha", crsam_alpha, low=0.0)
    crsam_beta = guarded("crsam_beta", crsam_beta, low=0.0)
    if radius_optimizer is None:
        radius_optimizer = lets_radius_optimizer()
    _check_transformation("radius_optimizer", radius_optimizer)

    base = optax.with_extra_args_support(base_optimizer)
    radius_opt = optax.with_extra_args_support(radius_optimizer)
    rule = _inner_rule(inner, eta, mask, crsam_alpha, crsam_beta)
    n_probes = 1 + len(rule.signs) + 2
    alpha0 = jnp.log(jnp.asarray(rho, jnp.float32))
    fd_step = float(fd_step)

    def hyper_of(count):
        return {"eta": value_at(eta, count), "crsam_alpha": value_at(crsam_alpha, count),
                "crsam_beta": value_at(crsam_beta, count)}

    def init(params: PyTree) -> LetsEstimatorState:
        alpha = jnp.array(alpha0)
        # distinct buffers for every leaf: a state may be donated to a jitted step
        return LetsEstimatorState(count=jnp.zeros((), jnp.int32), log_rho=alpha,
                                  radius_state=radius_opt.init(jnp.array(alpha0)),
                                  radius_skips=jnp.zeros((), jnp.int32))

    def value_and_grad(
        params: PyTree,
        state: LetsEstimatorState,
        batch: PyTree,
        *,
        val_batch: PyTree = None,
        base_state: optax.OptState = None,
        loss_kwargs: dict | None = None,
        clean_grad: PyTree = None,
    ):
        check_state("lets", state, LetsEstimatorState, "est.init(params)")
        if batch is None:
            raise ValueError("lets: value_and_grad needs the training mini-batch")
        if val_batch is None:
            raise ValueError(
                "lets: needs the validation mini-batch val_batch= (the paper samples it from the training set: "
                "another random mini-batch)"
            )
        if base_state is None:
            raise ValueError("lets: needs base_state=, the current state of your base optimizer "
                             "(the lookahead step w' = w + base.update(d, base_state, w) uses it)")
        expected = jax.eval_shape(base.init, params)
        if jax.tree.structure(base_state) != jax.tree.structure(expected):
            raise ValueError(
                "lets: base_state does not have the structure of base_optimizer.init(params): pass the state "
                f"of the same optimizer you apply the direction with (got {jax.tree.structure(base_state)}, "
                f"expected {jax.tree.structure(expected)})"
            )
        check_data_parallel("lets", params, batch, axis_name)
        if clean_grad is not None:
            check_like_params("lets", "clean_grad", clean_grad, params)
        ev_full = Evaluator(loss_fn, has_aux, dict(loss_kwargs or {}), axis_name, "sequential")
        ev, w, expand = ev_full, params, (lambda t: t)
        if trainable is not None:  # the inner rule sees the trainable leaves; frozen ones get d = 0
            mask = resolve_trainable("lets", trainable, params)
            w = select(params, mask)
            clean_grad = None if clean_grad is None else select(clean_grad, mask)
            ev = Evaluator(lambda sub, b, **kw: loss_fn(merge(sub, params, mask), b, **kw), has_aux,
                           dict(loss_kwargs or {}), axis_name, "sequential")
            zeros = jax.tree.map(jnp.zeros_like, params)
            expand = lambda t: merge(t, zeros, mask)  # noqa: E731
        count = state.count
        hyper = hyper_of(count)
        alpha = state.log_rho
        rho_t = jnp.exp(alpha)

        if clean_grad is not None:
            loss0, aux0, g = jnp.asarray(NAN, compute_dtype(params)), None, clean_grad
        else:
            loss0, aux0, g = ev.value_and_grad(w, batch)

        def direction(r):
            """The inner direction at radius r (trainable leaves), with the losses and gradients at its points."""
            e = rule.ascent(g, w, r, hyper)
            points = [add_scaled(w, e) if s == 1.0 else add_scaled(w, e, s) for s in rule.signs]
            results = [ev.value_and_grad(p, batch) for p in points]
            grads = [res[2] for res in results]
            return rule.combine(grads, g, hyper), (jnp.stack([res[0] for res in results]), grads)

        def full_direction(r):
            d_r, measured = direction(r)
            return expand(d_r), measured

        def base_step(x):
            return base.update(x, base_state, params)

        one = jnp.ones((), jnp.float32)

        def with_radius_update(_):
            """The direction, and the radius update from the one-step hypergradient."""
            if hypergradient == "exact_total":

                def upper_of_alpha(a):
                    d, (point_losses, _) = full_direction(jnp.exp(a))
                    u, _ = base_step(d)
                    w1 = optax.apply_updates(params, u)
                    lv = ev_full.value_and_grad(w1, val_batch)[0]
                    lb = ev_full.value_and_grad(w1, batch)[0]
                    gap = lv - lb
                    return 0.5 * gap * gap, (d, point_losses, lv, lb, gap)

                upper, hypergrad, (d, point_losses, lv, lb, gap) = jax.jvp(
                    upper_of_alpha, (alpha,), (one,), has_aux=True
                )
            else:
                if hypergradient == "exact":
                    d, dd, (point_losses, _) = jax.jvp(full_direction, (rho_t,), (one,), has_aux=True)
                else:
                    d_w, (point_losses, grads) = direction(rho_t)
                    v = rule.ascent(g, w, one, hyper)  # de/dρ
                    if hypergradient == "diag":
                        dd = None
                        for a_i, s_i, gi in zip(rule.weights(hyper), rule.signs, grads):
                            term = jax.tree.map(
                                lambda x, vv, c=a_i * s_i: c * x.astype(jnp.float32) ** 2 * vv.astype(jnp.float32),
                                gi, v)
                            dd = term if dd is None else jax.tree.map(jnp.add, dd, term)
                    else:
                        r = fd_step / (global_norm(v) + XI)
                        d_plus = direction(rho_t + r)[0]
                        if hypergradient == "fd":
                            dd = jax.tree.map(lambda x: x / (2.0 * r), _sub(d_plus, direction(rho_t - r)[0]))
                        else:
                            dd = jax.tree.map(lambda x: x / r, _sub(d_plus, d_w))
                    d, dd = expand(d_w), expand(cast_like(dd, d_w))
                dd = cast_like(dd, d)
                (u, _), (du, _) = jax.jvp(base_step, (d,), (dd,))
                w1 = optax.apply_updates(params, u)
                lv, _, gv = ev_full.value_and_grad(w1, val_batch)
                lb, _, gb = ev_full.value_and_grad(w1, batch)
                gap = lv - lb
                upper = 0.5 * gap * gap
                hypergrad = rho_t * gap * vdot(_sub(gv, gb), du)

            hypergrad = jnp.asarray(hypergrad, jnp.float32)
            radius_updates, new_radius_state = radius_opt.update(hypergrad, state.radius_state, alpha)
            new_alpha = jnp.asarray(optax.apply_updates(alpha, radius_updates), jnp.float32)
            ok = jnp.isfinite(hypergrad) & jnp.isfinite(new_alpha)
            new_alpha = jnp.where(ok, new_alpha, alpha)
            new_radius_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_radius_state, state.radius_state)
            skips = state.radius_skips + jnp.logical_not(ok).astype(jnp.int32)
            measured = [jnp.asarray(x, jnp.float32) for x in (lv, lb, gap, upper, hypergrad)]
            return d, jnp.asarray(point_losses, jnp.float32), measured, new_alpha, new_radius_state, skips

        def without_radius_update(_):
            """The inner method's direction at the current radius: SAM's cost (NaN upper-level values)."""
            d, (point_losses, _) = full_direction(rho_t)
            nan = jnp.full((), jnp.nan, jnp.float32)
            return (d, jnp.asarray(point_losses, jnp.float32), [nan] * 5, alpha, state.radius_state,
                    state.radius_skips)

        if radius_every == 1:
            outcome = with_radius_update(None)
        else:
            outcome = jax.lax.cond(count % radius_every == 0, with_radius_update, without_radius_update, None)
        d, point_losses, (lv, lb, gap, upper, hypergrad), new_alpha, new_radius_state, skips = outcome

        diagnostics = {
            "rho": rho_t, "upper_loss": upper, "gap": gap, "hypergrad": hypergrad,
            "grad_norm": global_norm(g), "radius_skips": skips,
        }
        info = Info(
            probe_losses=jnp.concatenate([jnp.reshape(jnp.asarray(loss0, jnp.float32), (1,)),
                                          jnp.asarray(point_losses, jnp.float32),
                                          jnp.stack([lv, lb]).astype(jnp.float32)]),
            diagnostics={k: jnp.asarray(diagnostics[k]) for k in DIAGNOSTICS},
        )
        new_state = LetsEstimatorState(optax.safe_increment(count), new_alpha, new_radius_state, skips)
        value = (loss0, aux0) if has_aux else loss0
        return value, cast_like(d, params), new_state, info

    return LetsEstimator(name="lets", init=init, value_and_grad=value_and_grad, has_aux=has_aux,
                         n_probes=n_probes, diagnostics=DIAGNOSTICS, base_optimizer=base)


def lets_transformation(estimator: LetsEstimator, *, aux_init: PyTree = None) -> optax.GradientTransformationExtraArgs:
    """The Optax form of a LETS estimator: the estimator's direction applied by its base optimizer."""
    aux_template = aux_template_of(estimator, aux_init)
    base = estimator.base_optimizer

    def init_fn(params: PyTree) -> LetsState:
        est = estimator.init(params)
        info = empty_info(estimator, aux_template, jnp.float32)
        flat = FlatState(count=est.count, key=raw_key(0), method=(), info=info)
        return LetsState(est.log_rho, est.radius_state, base.init(params), est.radius_skips, flat)

    def update_fn(updates, state: LetsState, params: PyTree = None, *, batch: PyTree = None,
                  val_batch: PyTree = None, loss_kwargs: dict | None = None, clean_grad: PyTree = None,
                  **unused_extra_args: Any):
        if params is None:
            raise ValueError("lets: update needs params: tx.update(None, state, params, batch=..., val_batch=...)")
        if batch is None:
            raise ValueError("lets: update needs the training mini-batch: tx.update(..., batch=batch)")
        if not isinstance(state, LetsState):
            raise ValueError(f"lets: state must be the LetsState made by tx.init(params), got {type(state).__name__}")
        check_extra_args("lets", unused_extra_args, ("batch", "val_batch", "loss_kwargs", "clean_grad"))
        check_not_masked("lets", params)
        updates_as_clean_grad("lets", updates, clean_grad)
        est = LetsEstimatorState(state.flat.count, state.log_rho, state.radius_state, state.radius_skips)
        value, d, est, info = estimator.value_and_grad(
            params, est, batch, val_batch=val_batch, base_state=state.base_state, loss_kwargs=loss_kwargs,
            clean_grad=clean_grad)
        u, new_base_state = base.update(d, state.base_state, params)
        loss, aux = value if estimator.has_aux else (value, None)
        aux = state.flat.info.aux if aux is None else check_aux("lets", aux, aux_template)
        new_info = cast_like(StepInfo(loss, info.probe_losses, aux, info.diagnostics), state.flat.info)
        flat = FlatState(est.count, state.flat.key, state.flat.method, new_info)
        new_state = LetsState(est.log_rho, est.radius_state, new_base_state, est.radius_skips, flat)
        return cast_like(u, params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
