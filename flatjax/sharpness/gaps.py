"""Sharpness measures built from losses and gradients at perturbed weights.

* :func:`normalized_hessian_trace` — CR-SAM's curvature measure (Wu, Luo & Wunsch, AAAI 2024):
  ``C(w) = Tr(∇²L(w)) / ||∇L(w)||``.
* :func:`sam_approximation_ratio` — CR-SAM's approximation ratio (their eq. 2 and Fig. 1) of SAM's
  one-step ascent: ``AR = (L(w + ρ ĝ) - L(w)) / max_t (L(w + ε_t) - L(w))`` where ``ĝ = g/||g||`` and
  ``ε_t`` are the iterates of a multi-step projected normalised gradient ascent in the ball
  ``||ε|| <= ρ`` (``ε_1 = ρ ĝ`` is SAM's step, so ``AR <= 1`` whenever the denominator is positive).
  CR-SAM uses 20 ascent steps and averages a per-example ratio over 5000 training examples; here
  the ratio is of the gaps of the (batch or dataset) loss, which is stable when per-example gaps are
  tiny. The step size of their ascent is not stated; ours is ``step_size · ρ``.
* :func:`random_perturbation_gaps` — average- and worst-case ``L(w + ε) - L(w)`` over random ``ε``:
  isotropic Gaussian ``N(0, σ²I)`` (NSO, Zhang et al., TMLR 2024, Fig. 2, compared with the
  second-order prediction ``(σ²/2) Tr(H)``), uniform on the sphere of radius ``r``, or RWP's
  filter-wise Gaussian (Li et al., TMLR 2024, Fig. 1).
* :func:`adversarial_perturbation_gaps` — the worst case in the ball of radius ``r``, by the same
  multi-step ascent (RWP Fig. 1: random vs adversarial perturbations against the radius).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.validate import check_choice, check_key, check_nonnegative, check_positive_int, invalid
from .common import Batch, progress
from .directions import filter_wise_noise
from .hvp import HessianOperator, LossFn, Params, as_operator
from .trace import TraceEstimate, hutchinson_trace, probe_vectors

RANDOM_KINDS = ("gaussian", "sphere", "filter")
_XI = 1e-12  # SAM's guard against division by zero


class NormalizedTrace(NamedTuple):
    """Result of :func:`normalized_hessian_trace`."""

    value: float
    """``C(w) = Tr(H) / ||∇L(w)||``."""
    stderr: float
    """Standard error of ``value`` (from the trace estimate; the gradient is exact)."""
    trace: TraceEstimate
    """The Hutchinson estimate used."""
    grad_norm: float
    """``||∇L(w)||`` (global L2 norm over all leaves)."""


class SamApproximation(NamedTuple):
    """Result of :func:`sam_approximation_ratio`."""

    ratio: float
    """``sam_gap / best_gap`` (nan when ``best_gap <= 0``)."""
    sam_gap: float
    """``L(w + ρ ĝ) - L(w)``: SAM's one-step sharpness."""
    best_gap: float
    """Largest ``L(w + ε_t) - L(w)`` over the ascent iterates (including SAM's)."""
    gaps: np.ndarray
    """Gap at every iterate ``ε_1..ε_K`` (``gaps[0] == sam_gap``)."""
    rho: float
    base_loss: float


class GapCurve(NamedTuple):
    """Perturbed-loss gaps against the perturbation scale."""

    kind: str
    """``"gaussian"``, ``"sphere"``, ``"filter"`` or ``"adversarial"``."""
    scales: np.ndarray
    """σ (gaussian, filter) or radius ``r`` (sphere, adversarial)."""
    mean_gap: np.ndarray
    """Average-case gap ``E[L(w+ε)] - L(w)`` (adversarial: the best gap found)."""
    stderr: np.ndarray
    """Standard error of ``mean_gap`` (0 for adversarial)."""
    max_gap: np.ndarray
    """Worst case over the random samples (adversarial: same as ``mean_gap``)."""
    mean_norm: np.ndarray
    """Average ``||ε||``, to put random and adversarial curves on one radius axis."""
    predicted: np.ndarray | None
    """Second-order prediction from a trace, when given: gaussian ``(σ²/2) Tr(H)``, sphere
    ``r² Tr(H) / (2d)``; None otherwise."""
    base_loss: float
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists of floats)."""
        out = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
               for k, v in self._asdict().items()}
        return out


def _scales(name: str, values: Any) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise invalid(name, "a non-empty 1-D sequence of finite numbers >= 0", values)
    return arr


def normalized_hessian_trace(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    key: jax.Array | None = None,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    trace: TraceEstimate | None = None,
    **trace_options: Any,
) -> NormalizedTrace:
    """CR-SAM's normalised Hessian trace ``C(w) = Tr(∇²L(w)) / ||∇L(w)||`` (Wu et al., AAAI 2024).

    The trace is estimated with :func:`hutchinson_trace` (``trace_options`` are passed on, e.g.
    ``probe``, ``max_samples``, ``rtol``), or taken from ``trace`` if already computed on the same
    loss and data. The gradient norm is exact (global L2 norm over all leaves).

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      key: random key for the Hutchinson probes (required unless ``trace`` is given).
      trace: a precomputed :class:`TraceEstimate` to reuse.
    """
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    if trace is None:
        trace = hutchinson_trace(op, key=check_key(key), **trace_options)
    elif not isinstance(trace, TraceEstimate):
        raise invalid("trace", "a TraceEstimate from hutchinson_trace or None", type(trace).__name__)
    _, g = op.loss_and_grad()
    gn = float(jnp.linalg.norm(g))
    if not gn > 0:
        raise invalid("params", "a point with a non-zero gradient (C(w) divides by ||∇L||)",
                   "zero gradient")
    return NormalizedTrace(trace.trace / gn, trace.stderr / gn, trace, gn)


def _ascent(op: HessianOperator, rho: float, num_steps: int, step_size: float
            ) -> tuple[float, np.ndarray]:
    """Projected normalised gradient ascent in ``||ε|| <= ρ`` from SAM's point; gaps per iterate."""
    base, g = op.loss_and_grad()
    zero = jnp.zeros_like(g)
    eps = _ascent_step(zero, g, rho, 1.0)  # ε_1 = ρ g / (||g|| + ξ): SAM's one-step perturbation
    gaps = []
    for t in range(num_steps):
        loss, g = op.loss_and_grad(eps)
        gaps.append(loss - base)
        if t == num_steps - 1:
            break
        eps = _ascent_step(eps, g, rho, step_size)
    return base, np.asarray(gaps)


@jax.jit
def _ascent_step(eps: jax.Array, g: jax.Array, rho: float, step_size: float) -> jax.Array:
    """``Π_ρ(ε + step_size · ρ · g / (||g|| + ξ))`` (projection onto the ball ``||ε|| <= ρ``)."""
    eps = eps + step_size * rho * g / (jnp.linalg.norm(g) + _XI)
    return eps * jnp.minimum(1.0, rho / (jnp.linalg.norm(eps) + _XI))


def sam_approximation_ratio(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    rho: float,
    num_steps: int = 20,
    step_size: float = 1.0,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
) -> SamApproximation:
    """SAM's one-step approximation ratio (CR-SAM, Wu et al., AAAI 2024, eq. 2 / Fig. 1).

    Definition used here::

        ε_1     = ρ g / (||g|| + 1e-12)                       (SAM's step, g = ∇L(w))
        ε_{t+1} = Π_ρ(ε_t + step_size · ρ · ∇L(w+ε_t) / ||∇L(w+ε_t)||),   t = 1..K-1
        AR      = (L(w + ε_1) - L(w)) / max_{t<=K} (L(w + ε_t) - L(w))

    where ``Π_ρ`` projects onto the ball ``||ε|| <= ρ`` and ``K = num_steps`` (CR-SAM: 20). Since the
    maximum includes SAM's own point, ``AR <= 1`` when the denominator is positive; ``AR`` near 1
    means the one-step ascent finds (nearly) the worst perturbation. ``nan`` if no iterate raises
    the loss. The ratio is of dataset-loss gaps (not a mean of per-example ratios, see module doc).
    Cost: ``K + 1`` gradient evaluations.

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      rho: radius ``ρ > 0`` (SAM's).
      num_steps: ascent iterates ``K >= 1`` (``K = 1`` gives ``AR = 1``).
      step_size: ascent step as a fraction of ``ρ`` (> 0).
    """
    rho = check_nonnegative("rho", rho, positive=True)
    num_steps = check_positive_int("num_steps", num_steps)
    step_size = check_nonnegative("step_size", step_size, positive=True)
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    base, gaps = _ascent(op, rho, num_steps, step_size)
    best = float(np.max(gaps))
    ratio = float(gaps[0] / best) if best > 0 else float("nan")
    return SamApproximation(ratio, float(gaps[0]), best, gaps, rho, base)


def random_perturbation_gaps(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    key: jax.Array,
    scales: Sequence[float] | np.ndarray,
    kind: str = "gaussian",
    num_samples: int = 16,
    antithetic: bool = True,
    trace: float | TraceEstimate | None = None,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    progress_bar: bool = False,
) -> GapCurve:
    """Average- and worst-case loss increase under random weight perturbations.

    ``gap(ε) = L(w + ε) - L(w)`` for ``num_samples`` draws of ``ε`` at each scale:

    * ``kind="gaussian"``: ``ε ~ N(0, σ² I)`` at absolute scale (NSO, Zhang et al., TMLR 2024;
      ``E[gap] ≈ (σ²/2) Tr(H)``, their Fig. 2);
    * ``kind="sphere"``: ``ε = r z / ||z||``, uniform direction with ``||ε|| = r``
      (``E[gap] ≈ r² Tr(H) / (2d)``);
    * ``kind="filter"``: RWP's filter-wise noise ``ε_f = σ ||w_f|| z`` (Li et al., TMLR 2024;
      see :func:`filter_wise_noise`).

    With ``antithetic=True`` (default) every draw is used as the pair ``±ε`` and the pair mean is
    one sample: the first-order term cancels exactly (as in NSO's two-point estimate), which cuts
    the variance of the *mean* gap a lot without changing its expectation; the worst case is over
    all ``2 · num_samples`` points. The same draws (rescaled) are used at every scale (common
    random numbers), which makes the curve smooth in the scale.

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      key: random key (same key, same result).
      scales: σ values (gaussian, filter) or radii (sphere), each >= 0.
      kind: ``"gaussian"``, ``"sphere"`` or ``"filter"``.
      num_samples: independent draws per scale (>= 2).
      antithetic: evaluate ``±ε`` pairs.
      trace: ``Tr(H)`` (a float or a :class:`TraceEstimate`) to fill ``predicted``.
      progress_bar: show a tqdm bar.
    """
    key = check_key(key)
    scales = _scales("scales", scales)
    check_choice("kind", kind, RANDOM_KINDS)
    num_samples = check_positive_int("num_samples", num_samples, 2)
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    base = op.loss()
    units = []
    for i in range(num_samples):  # unit-scale draws, reused at every scale
        k = jax.random.fold_in(key, i)
        if kind == "filter":
            u = op.ravel(filter_wise_noise(k, op.params, 1.0))
        else:
            u = probe_vectors(k, (op.dim,), "gaussian", op.dtype)
            if kind == "sphere":
                u = u / jnp.linalg.norm(u)
        units.append(u)
    norms = np.array([float(jnp.linalg.norm(u)) for u in units])
    mean_gap, stderr, max_gap, mean_norm = [], [], [], []
    for s in progress(scales, progress_bar, f"{kind} perturbations", scales.size):
        per_sample, all_points = [], []
        for u in units:
            g_plus = op.loss(s * u) - base
            if antithetic:
                g_minus = op.loss(-s * u) - base
                per_sample.append(0.5 * (g_plus + g_minus))
                all_points += [g_plus, g_minus]
            else:
                per_sample.append(g_plus)
                all_points.append(g_plus)
        per_sample = np.asarray(per_sample)
        mean_gap.append(per_sample.mean())
        stderr.append(per_sample.std(ddof=1) / np.sqrt(per_sample.size))
        max_gap.append(max(all_points))
        mean_norm.append(s * norms.mean())
    predicted = None
    if trace is not None:
        tr = trace.trace if isinstance(trace, TraceEstimate) else float(trace)
        if kind == "gaussian":
            predicted = 0.5 * scales**2 * tr
        elif kind == "sphere":
            predicted = 0.5 * scales**2 * tr / op.dim
    return GapCurve(kind, scales, np.asarray(mean_gap), np.asarray(stderr), np.asarray(max_gap),
                    np.asarray(mean_norm), predicted, base, num_samples)


def adversarial_perturbation_gaps(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    radii: Sequence[float] | np.ndarray,
    num_steps: int = 20,
    step_size: float = 1.0,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    progress_bar: bool = False,
) -> GapCurve:
    """Worst-case loss increase ``max_{||ε||<=r} L(w+ε) - L(w)`` against the radius (RWP Fig. 1).

    The maximum is approximated by the multi-step ascent of :func:`sam_approximation_ratio`
    (SAM's step, then ``num_steps - 1`` projected normalised gradient steps of ``step_size · r``),
    keeping the best iterate; a lower bound on the true worst case. Radius 0 gives gap 0.

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      radii: ball radii, each >= 0.
      num_steps: ascent iterates per radius (>= 1; 1 = SAM's one step).
      step_size: ascent step as a fraction of the radius (> 0).
      progress_bar: show a tqdm bar.
    """
    radii = _scales("radii", radii)
    num_steps = check_positive_int("num_steps", num_steps)
    step_size = check_nonnegative("step_size", step_size, positive=True)
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    base = op.loss()
    best = []
    for r in progress(radii, progress_bar, "adversarial perturbations", radii.size):
        best.append(0.0 if r == 0 else float(np.max(_ascent(op, float(r), num_steps, step_size)[1])))
    best = np.asarray(best)
    return GapCurve("adversarial", radii, best, np.zeros_like(best), best, radii.copy(), None,
                    base, 1)
