"""Hessian trace by Hutchinson's estimator with a standard-error stopping rule.

``Tr(H) = E[zᵀ H z]`` for any probe ``z`` with ``E[z zᵀ] = I`` (Hutchinson 1990; Avron & Toledo
2011). Rademacher probes (±1) minimise the variance among i.i.d. probes
(``Var = 2 Σ_{i≠j} H_ij²``); Gaussian probes add ``2 Σ_i H_ii²``. PyHessian (Yao et al. 2020) stops
when the running mean changes by less than a tolerance; that says nothing about the error, so here
the rule is on the *standard error* of the mean: stop once ``stderr <= max(atol, rtol·|mean|)``
after at least ``min_samples`` probes. ``stderr`` is the sample standard deviation of the probe
values over ``sqrt(n)``, so ``trace ± 2·stderr`` is an approximate 95% interval.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from ..core.validate import check_choice, check_key, check_nonnegative, check_positive_int
from .common import Batch, progress
from .hvp import HessianOperator, LossFn, Params, as_operator, to_numpy

PROBES = ("rademacher", "gaussian")


class TraceEstimate(NamedTuple):
    """Result of :func:`hutchinson_trace`."""

    trace: float
    """Mean of the probe values ``zᵀHz``: the estimate of ``Tr(H)``."""
    stderr: float
    """Standard error of ``trace`` (sample std / sqrt(num_samples)); nan for one sample."""
    num_samples: int
    """Number of probes used."""
    converged: bool
    """Whether the stopping rule was met before ``max_samples``."""
    samples: np.ndarray
    """The individual probe values ``zᵀHz`` (float64, length ``num_samples``)."""


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def probe_vectors(key: jax.Array, shape: tuple[int, ...], kind: str, dtype: Any) -> jax.Array:
    """Random probes with identity second moment: Rademacher (±1) or standard Gaussian."""
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    return jax.random.normal(key, shape, dtype)


def hutchinson_trace(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    key: jax.Array,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    probe: str = "rademacher",
    max_samples: int = 200,
    min_samples: int = 10,
    rtol: float = 0.01,
    atol: float = 0.0,
    block_size: int = 1,
    progress_bar: bool = False,
) -> TraceEstimate:
    """Estimate ``Tr(∇²L(params))`` with Hutchinson's method (Hutchinson 1990).

    Args:
      loss_fn: ``loss_fn(params, batch)``, or a :class:`HessianOperator` (then leave ``params``,
        ``batch`` and ``batches`` as None).
      params, batch, batches, has_aux, weighting: the loss and data; see :class:`HessianOperator`.
      key: ``jax.random`` key; the same key gives the same probes and the same result.
      probe: ``"rademacher"`` (default, lower variance) or ``"gaussian"``.
      max_samples: hard cap on the number of probes (>= min_samples).
      min_samples: probes drawn before the stopping rule is checked (>= 2).
      rtol, atol: stop when ``stderr <= max(atol, rtol * |trace|)``; ``rtol = atol = 0`` runs all
        ``max_samples`` probes.
      block_size: probes evaluated together per call with ``vmap`` (same result, more memory,
        usually more samples per second). The stopping rule is checked after each block.
      progress_bar: show a tqdm bar.

    Returns:
      :class:`TraceEstimate` ``(trace, stderr, num_samples, converged, samples)``.
    """
    key = check_key(key)
    check_choice("probe", probe, PROBES)
    min_samples = check_positive_int("min_samples", min_samples, 2)
    max_samples = check_positive_int("max_samples", max_samples, min_samples)
    rtol = check_nonnegative("rtol", rtol)
    atol = check_nonnegative("atol", atol)
    block_size = check_positive_int("block_size", block_size)
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)

    values: list[float] = []
    converged = False
    num_blocks = -(-max_samples // block_size)
    bar = progress(range(num_blocks), progress_bar, "Hutchinson trace", num_blocks)
    for i in bar:
        z = probe_vectors(jax.random.fold_in(key, i), (block_size, op.dim), probe, op.dtype)
        values.extend(to_numpy(op.quadratic_forms(z)).tolist())
        values = values[:max_samples]
        n = len(values)
        if n >= min_samples:
            mean = float(np.mean(values))
            se = float(np.std(values, ddof=1) / np.sqrt(n))
            if (rtol > 0 or atol > 0) and se <= max(atol, rtol * abs(mean)):
                converged = True
                break
        if n >= max_samples:
            break
    if hasattr(bar, "close"):
        bar.close()
    samples = np.asarray(values, dtype=np.float64)
    n = samples.size
    se = float(np.std(samples, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return TraceEstimate(float(samples.mean()), se, int(n), converged, samples)
