"""Sharpness measurements for JAX models: Hessian trace, spectrum, landscapes, perturbed losses.

A JAX counterpart of PyHessian (Yao et al. 2020) and loss-landscape (Li et al. 2018), plus the
measures the flat-minima papers argue with (CR-SAM's normalised trace and SAM approximation ratio,
RWP's random-vs-adversarial perturbation curves, NSO's perturbation gap vs ``(σ²/2) Tr(H)``).

Every estimator takes ``loss_fn(params, batch) -> scalar`` (or ``(scalar, aux)`` with
``has_aux=True``), ``params`` (any pytree) and either ``batch`` or ``batches`` (an iterable; the
quantities are those of the weighted mean loss, see :class:`HessianOperator`), plus an explicit
``key`` where randomness is involved. Measure in evaluation mode: BatchNorm running statistics and
no dropout inside ``loss_fn`` (see :mod:`flatjax.sharpness.hvp`). A :class:`HessianOperator` may be
passed in place of ``loss_fn`` (with ``params``/``batch`` left out) to share one set of batches.

Plotting lives in :mod:`flatjax.sharpness.plots` (needs matplotlib; imported on demand).
"""

from .density import SpectralDensity, slq_density
from .directions import filter_normalize, filter_normalized_direction, filter_wise_noise
from .eigen import (EigenResult, Tridiagonal, lanczos_eigenvalues, lanczos_tridiagonal,
                    power_iteration)
from .gaps import (GapCurve, NormalizedTrace, SamApproximation, adversarial_perturbation_gaps,
                   normalized_hessian_trace, random_perturbation_gaps, sam_approximation_ratio)
from .hvp import HessianOperator, hvp
from .landscape import Landscape1D, Landscape2D, loss_landscape_1d, loss_landscape_2d
from .trace import TraceEstimate, hutchinson_trace

__all__ = [
    "HessianOperator",
    "hvp",
    "hutchinson_trace",
    "TraceEstimate",
    "power_iteration",
    "lanczos_eigenvalues",
    "lanczos_tridiagonal",
    "EigenResult",
    "Tridiagonal",
    "slq_density",
    "SpectralDensity",
    "normalized_hessian_trace",
    "NormalizedTrace",
    "sam_approximation_ratio",
    "SamApproximation",
    "random_perturbation_gaps",
    "adversarial_perturbation_gaps",
    "GapCurve",
    "filter_normalize",
    "filter_normalized_direction",
    "filter_wise_noise",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "Landscape1D",
    "Landscape2D",
]
