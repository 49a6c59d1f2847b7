"""Matplotlib figures for the sharpness measurements, saved as PNG.

matplotlib is an optional dependency and is imported lazily inside each function (no pyplot
global state: figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, so this works
headless and in threads).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.validate import check_choice, invalid
from .density import SpectralDensity
from .gaps import GapCurve
from .landscape import Landscape1D, Landscape2D


def _figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("flatjax.sharpness.plots needs matplotlib: pip install matplotlib") from exc
    return Figure(figsize=figsize, dpi=110, layout="constrained")


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path)
    return path


def plot_landscape_1d(landscape: Landscape1D, path: str | os.PathLike, *,
                      title: str | None = None, log_scale: bool = False) -> str:
    """Loss along a filter-normalised direction (Li et al. 2018); returns the PNG path."""
    if not isinstance(landscape, Landscape1D):
        raise invalid("landscape", "a Landscape1D from loss_landscape_1d", type(landscape).__name__)
    fig = _figure((5.0, 3.6))
    ax = fig.add_subplot()
    ax.plot(landscape.alphas, landscape.losses, lw=2)
    ax.axvline(0.0, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("step α along filter-normalised direction")
    ax.set_ylabel("loss")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title or "1-D loss landscape")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_landscape_2d(landscape: Landscape2D, path: str | os.PathLike, *, kind: str = "contour",
                      levels: int = 30, title: str | None = None, clip: float | None = None) -> str:
    """2-D landscape as a filled contour map or a 3-D surface (Li et al. 2018); returns the path.

    Args:
      landscape: from :func:`loss_landscape_2d`.
      path: PNG file to write.
      kind: ``"contour"`` or ``"surface"``.
      levels: number of contour levels (>= 2).
      title: figure title.
      clip: upper limit on the plotted loss (default: none); the far corners of a landscape can
        be orders of magnitude above the minimum and flatten the picture.
    """
    if not isinstance(landscape, Landscape2D):
        raise invalid("landscape", "a Landscape2D from loss_landscape_2d", type(landscape).__name__)
    check_choice("kind", kind, ("contour", "surface"))
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise invalid("levels", "an integer >= 2", levels)
    z = np.asarray(landscape.losses, dtype=np.float64)
    if clip is not None:
        z = np.minimum(z, float(clip))
    a, b = np.meshgrid(landscape.alphas, landscape.betas, indexing="ij")
    fig = _figure((5.4, 4.4))
    if kind == "contour":
        ax = fig.add_subplot()
        cs = ax.contourf(a, b, z, levels=levels, cmap="viridis")
        ax.contour(a, b, z, levels=levels, colors="k", linewidths=0.3, alpha=0.5)
        ax.plot([0], [0], marker="*", color="red", ms=10)
        fig.colorbar(cs, ax=ax, label="loss")
        ax.set_aspect("equal")
    else:
        ax = fig.add_subplot(projection="3d")
        surf = ax.plot_surface(a, b, z, cmap="viridis", linewidth=0, antialiased=True)
        fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.1, label="loss")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_title(title or "2-D loss landscape (filter-normalised)")
    return _save(fig, path)


def plot_spectral_density(density: SpectralDensity, path: str | os.PathLike, *,
                          eigenvalues: Sequence[float] | None = None, bandwidth: float = 0.01,
                          log_scale: bool = True, title: str | None = None) -> str:
    """Smoothed SLQ spectral density (Ghorbani et al. 2019), log scale by default; returns the path.

    ``eigenvalues`` (e.g. the Lanczos top-k) are marked with vertical lines.
    """
    if not isinstance(density, SpectralDensity):
        raise invalid("density", "a SpectralDensity from slq_density", type(density).__name__)
    grid, dens = density.evaluate(bandwidth=bandwidth)
    fig = _figure((5.4, 3.6))
    ax = fig.add_subplot()
    floor = 1e-12 * max(float(dens.max()), 1e-300)
    ax.plot(grid, np.maximum(dens, floor) if log_scale else dens, lw=1.5)
    if log_scale:
        ax.set_yscale("log")
        ax.set_ylim(bottom=max(floor, float(dens.max()) * 1e-8))
    for lam in ([] if eigenvalues is None else np.asarray(eigenvalues).ravel()):
        ax.axvline(float(lam), color="red", lw=0.8, ls="--")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or "Hessian spectral density (SLQ)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_gap_curves(curves: Sequence[GapCurve], path: str | os.PathLike, *,
                    title: str | None = None, log_scale: bool = True) -> str:
    """Perturbed-loss gaps against the perturbation norm ``||ε||`` (RWP Fig. 1 style).

    Each random curve shows its mean gap (± 2 standard errors) and its worst case (dashed);
    adversarial curves show the best ascent gap. Second-order predictions are dotted. On the
    default log scale, points with a gap <= 0 (e.g. radius 0) are not drawn.
    """
    curves = list(curves)
    if not curves or not all(isinstance(c, GapCurve) for c in curves):
        raise invalid("curves", "a non-empty sequence of GapCurve", curves)
    fig = _figure((5.4, 3.8))
    ax = fig.add_subplot()
    def shown(y):
        y = np.asarray(y, dtype=np.float64)
        return np.where(y > 0, y, np.nan) if log_scale else y

    for c in curves:
        x = c.mean_norm
        label = "adversarial (best ascent)" if c.kind == "adversarial" else f"{c.kind} (mean)"
        line, = ax.plot(x, shown(c.mean_gap), marker="o", ms=3, label=label)
        if c.kind != "adversarial":
            lo = c.mean_gap - 2 * c.stderr
            ax.fill_between(x, shown(lo), shown(c.mean_gap + 2 * c.stderr),
                            color=line.get_color(), alpha=0.2)
            ax.plot(x, shown(c.max_gap), ls="--", color=line.get_color(),
                    label=f"{c.kind} (worst of samples)")
        if c.predicted is not None:
            ax.plot(x, shown(c.predicted), ls=":", color=line.get_color(),
                    label=f"{c.kind}: second-order prediction")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("perturbation norm ||ε||")
    ax.set_ylabel("L(w+ε) − L(w)")
    ax.set_title(title or "perturbed-loss gap")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)
