"""A PNG that shows a restoration at a glance: input, pseudo-healthy image and anomaly map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pseudohealthy.figures import save_figure
from pseudohealthy.figures.orientation import CONVENTION, EDGE_LABELS, axial_display
from pseudohealthy.figures.ranges import display_range

__all__ = ["CONVENTION_NOTE", "draw_edge_labels", "highest_scoring", "save_preview"]


def highest_scoring(slice_scores: Mapping[int, float], n: int = 4) -> list[int]:
    """The ``n`` highest-scoring slices, in axis order (evenly spread if scores tie)."""
    if not slice_scores:
        return []
    ranked = sorted(slice_scores, key=lambda k: (-slice_scores[k], k))
    return sorted(ranked[: max(1, n)])


CONVENTION_NOTE = f"{CONVENTION} view: the patient's right (R) on the image's left, anterior (A) up"
"""The line every axial PNG carries to state the display convention."""


def draw_edge_labels(ax: Any, plane: str = "axial", *, fontsize: float = 8) -> list[Any]:
    """Write the patient direction at the middle of each edge of ``ax`` (an image panel), from
    :data:`~pseudohealthy.figures.orientation.EDGE_LABELS`; returns the Text artists."""
    labels = EDGE_LABELS[plane]
    places = {
        "top": (0.5, 0.98, "center", "top"),
        "bottom": (0.5, 0.02, "center", "bottom"),
        "left": (0.02, 0.5, "left", "center"),
        "right": (0.98, 0.5, "right", "center"),
    }
    texts = []
    for edge, (x, y, ha, va) in places.items():
        text = ax.text(
            x,
            y,
            labels[edge],
            transform=ax.transAxes,
            ha=ha,
            va=va,
            fontsize=fontsize,
            fontweight="bold",
            color="yellow",
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "black", "edgecolor": "none", "alpha": 0.6},
        )
        text.set_gid(f"edge-label-{edge}")
        texts.append(text)
    return texts


def save_preview(
    path: str | Path,
    scan: np.ndarray,
    pseudo_healthy: np.ndarray,
    anomaly: np.ndarray,
    slices: Sequence[int],
    *,
    lesion: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    title: str = "",
    spacing: tuple[float, float] | None = None,
) -> Path:
    """Rows = ``slices`` of canonical ``(X, Y, Z)`` volumes; columns = input, restoration, map and
    (when given) ``uncertainty``, the members' disagreement.

    Slices are shown in the project's one convention (:mod:`pseudohealthy.figures.orientation`:
    radiological, anterior up) with R/L/A/P at the edges of every panel and the convention
    stated under the figure. ``lesion`` (optional, same shape) is outlined in every panel.
    The maps' colour limits come from the maps over the shown slices
    (:func:`~pseudohealthy.figures.ranges.display_range`), so maps of any scale (the reference's SSIM
    constants give values of order 1e-3) look alike. ``spacing`` (x, y in mm) keeps the
    physical aspect ratio. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    slices = list(slices)
    if not slices:
        raise ValueError("no slices to show")
    inside = scan[..., slices]
    lo, hi = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
    _, vmax_map = display_range(anomaly[..., slices])
    # displayed rows run along y, columns along x: a pixel is spacing[1] high, spacing[0] wide
    aspect = 1.0 if spacing is None else spacing[1] / spacing[0]
    panels = [
        ("input", scan, {"cmap": "gray", "vmin": lo, "vmax": hi}),
        ("pseudo-healthy", pseudo_healthy, {"cmap": "gray", "vmin": lo, "vmax": hi}),
        ("anomaly map (1 - SSIM)", anomaly, {"cmap": "inferno", "vmin": 0.0, "vmax": vmax_map}),
    ]
    if uncertainty is not None:
        _, vmax_u = display_range(uncertainty[..., slices])
        panels.append(
            ("uncertainty (member s.d.)", uncertainty, {"cmap": "viridis", "vmin": 0.0, "vmax": vmax_u})
        )
    fig, axes = plt.subplots(
        len(slices), len(panels), figsize=(3 * len(panels), 3 * len(slices) + 0.3), squeeze=False
    )
    for r, k in enumerate(slices):
        for c, (label, volume, kw) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(axial_display(volume[..., k]), aspect=aspect, interpolation="nearest", **kw)
            if lesion is not None and lesion[..., k].any():
                ax.contour(axial_display(lesion[..., k] > 0), levels=[0.5], colors="cyan", linewidths=0.8)
            draw_edge_labels(ax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"slice {k}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.005, CONVENTION_NOTE, ha="center", va="bottom", fontsize=8, color="0.3", gid="convention")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    try:
        path = save_figure(fig, path, dpi=90)
    finally:
        plt.close(fig)
    return path
