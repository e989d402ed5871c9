"""PR and ROC curve plots (matplotlib Agg canvas, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pseudohealthy.figures import save_figure

__all__ = ["save_pr_curves", "save_roc_curves", "thin_curve"]

CurvePoints = tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]


def thin_curve(x: np.ndarray, y: np.ndarray, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``n`` points of a curve, evenly spaced along its length; ends kept."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size <= n:
        return x, y
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
    if arc[-1] <= 0:
        keep = np.array([0, x.size - 1])
    else:
        keep = np.unique(np.searchsorted(arc, np.linspace(0.0, arc[-1], n)).clip(0, x.size - 1))
        keep = np.unique(np.r_[0, keep, x.size - 1])
    return x[keep], y[keep]


def _save(
    path: str | Path,
    curves: Mapping[str, CurvePoints],
    *,
    xlabel: str,
    ylabel: str,
    title: str | None,
    chance: Mapping[str, float] | None,
    diagonal: bool,
    dpi: int,
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (x, y) in curves.items():
        ax.plot(np.asarray(x), np.asarray(y), label=label, linewidth=1.5)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance")
    for label, level in (chance or {}).items():
        ax.axhline(level, color="0.6", linestyle=":", linewidth=1, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


def save_pr_curves(
    path: str | Path,
    curves: Mapping[str, CurvePoints],
    *,
    prevalence: float | None = None,
    title: str | None = "Pixel-level precision-recall",
    dpi: int = 120,
) -> Path:
    """Write a PNG of precision-recall curves, ``curves[label] = (recall, precision)``."""
    chance = {f"prevalence {prevalence:.3g}": prevalence} if prevalence is not None else None
    return _save(
        path, curves, xlabel="recall", ylabel="precision", title=title, chance=chance, diagonal=False, dpi=dpi
    )


def save_roc_curves(
    path: str | Path,
    curves: Mapping[str, CurvePoints],
    *,
    title: str | None = "Slice-level ROC",
    dpi: int = 120,
) -> Path:
    """Write a PNG of ROC curves, ``curves[label] = (fpr, tpr)``."""
    return _save(
        path,
        curves,
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title=title,
        chance=None,
        diagonal=True,
        dpi=dpi,
    )
