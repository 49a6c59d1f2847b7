"""Hessian spectral density by stochastic Lanczos quadrature (SLQ).

Ghorbani, Krishnan & Xiao (2019), "An investigation into neural net optimization via Hessian
eigenvalue density"; Yao et al. (2020), PyHessian; Lin, Saad & Yang (2016).

The spectral density ``φ(t) = (1/d) Σ_i δ(t - λ_i)`` is approximated, for a random unit vector
``v``, by the Gauss quadrature of the measure ``Σ_i (vᵀu_i)² δ(t - λ_i)``: run ``m`` Lanczos steps
from ``v``, diagonalise the tridiagonal ``T = S Θ Sᵀ``; the nodes are the Ritz values ``θ_j`` and
the weights ``τ_j = S_{1j}²`` (they sum to one). Averaging over ``num_runs`` random ``v`` and
smoothing each node with a Gaussian kernel of width ``σ`` gives a density that integrates to one.
Its mean equals the mean of ``vᵀHv = α_1`` over the runs, an unbiased estimate of ``Tr(H)/d``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import numpy as np

from ..core.validate import check_choice, check_key, check_nonnegative, check_positive_int, invalid
from .common import Batch, progress
from .eigen import lanczos_tridiagonal
from .hvp import HessianOperator, LossFn, Params, as_operator
from .trace import PROBES, probe_vectors


class SpectralDensity(NamedTuple):
    """Quadrature nodes and weights from :func:`slq_density` (one row per random start vector).

    Rows shorter than ``num_iters`` (Lanczos breakdown) are padded with weight 0.
    """

    nodes: np.ndarray
    """Ritz values ``θ``, shape ``(num_runs, m)``."""
    weights: np.ndarray
    """Quadrature weights ``τ`` (each row sums to one), shape ``(num_runs, m)``."""
    dim: int
    """Number of parameters ``d``."""

    def mean(self) -> float:
        """Mean of the estimated spectral measure: an estimate of ``Tr(H)/d``."""
        return float(np.mean(np.sum(self.nodes * self.weights, axis=1)))

    def trace(self) -> float:
        """``d · mean()``: an SLQ estimate of ``Tr(H)``."""
        return self.dim * self.mean()

    def evaluate(self, grid: np.ndarray | None = None, *, num_points: int = 1000,
                 bandwidth: float = 0.01, padding: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed density ``φ(t) = (1/R) Σ_r Σ_j τ_rj N(t; θ_rj, σ²)`` on a grid.

        Args:
          grid: evaluation points; default ``num_points`` evenly spaced points over
            ``[min θ - pad, max θ + pad]`` with ``pad = padding · range + 3σ``.
          num_points: grid size when ``grid`` is None (>= 2).
          bandwidth: kernel width ``σ`` as a fraction of the spectral range ``max θ - min θ``
            (PyHessian uses a fixed variance of 1e-5 on a normalised range).
          padding: extra grid margin as a fraction of the range.

        Returns:
          ``(grid, density)``; the density integrates to one over a grid that covers the nodes
          (the default grid does).
        """
        bandwidth = check_nonnegative("bandwidth", bandwidth, positive=True)
        padding = check_nonnegative("padding", padding)
        lo, hi = float(self.nodes.min()), float(self.nodes.max())
        span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1.0))
        sigma = bandwidth * span
        if grid is None:
            num_points = check_positive_int("num_points", num_points, 2)
            pad = padding * span + 3.0 * sigma
            grid = np.linspace(lo - pad, hi + pad, num_points)
        grid = np.asarray(grid, dtype=np.float64)
        diff = grid[:, None] - self.nodes.reshape(-1)[None, :]
        kern = np.exp(-0.5 * (diff / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))
        dens = kern @ self.weights.reshape(-1) / self.nodes.shape[0]
        return grid, dens


def slq_density(
    loss_fn: LossFn | HessianOperator,
    params: Params | None = None,
    batch: Batch | None = None,
    *,
    key: jax.Array,
    batches: Iterable[Batch] | None = None,
    has_aux: bool = False,
    weighting: str | Sequence[float] = "size",
    num_runs: int = 1,
    num_iters: int = 100,
    probe: str = "gaussian",
    progress_bar: bool = False,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019; PyHessian).

    Args:
      loss_fn, params, batch, batches, has_aux, weighting: the loss and data (see
        :class:`HessianOperator`); ``loss_fn`` may be a :class:`HessianOperator`.
      key: random key for the start vectors (same key, same result).
      num_runs: independent random start vectors ``R`` (PyHessian default 1); more runs reduce the
        variance of the weights, especially for the bulk near zero.
      num_iters: Lanczos steps per run ``m`` (capped at the number of parameters); cost
        ``R · m`` HVPs, memory ``m × d`` floats (full reorthogonalisation).
      probe: distribution of the start vector before normalisation: ``"gaussian"`` (uniform
        direction on the sphere; default) or ``"rademacher"``.
      progress_bar: show a tqdm bar over runs.

    Returns:
      :class:`SpectralDensity`; call ``.evaluate()`` for a smoothed curve.
    """
    key = check_key(key)
    num_runs = check_positive_int("num_runs", num_runs)
    num_iters = check_positive_int("num_iters", num_iters)
    check_choice("probe", probe, PROBES)
    op = as_operator(loss_fn, params, batch, batches, has_aux, weighting)
    m = min(num_iters, op.dim)
    nodes = np.zeros((num_runs, m))
    weights = np.zeros((num_runs, m))
    for r in progress(range(num_runs), progress_bar, "SLQ runs", num_runs):
        v0 = probe_vectors(jax.random.fold_in(key, r), (op.dim,), probe, op.dtype)
        tri = lanczos_tridiagonal(op.matvec, v0, m, reorthogonalize=True)
        theta, s = tri.eigh()
        n = theta.size
        nodes[r, :n] = theta
        nodes[r, n:] = theta[-1]  # padding nodes carry zero weight
        weights[r, :n] = s[0, :] ** 2
    if not np.all(np.isfinite(nodes)):
        raise invalid("loss_fn", "a loss with a finite Hessian at params", "non-finite Ritz values")
    return SpectralDensity(nodes, weights, op.dim)
