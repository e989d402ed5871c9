"""PNG galleries of synthetic anomalies: rows of (original, corrupted, mask overlay) triples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pseudohealthy.figures import save_figure
from pseudohealthy.figures.orientation import axial_display
from pseudohealthy.figures.preview import CONVENTION_NOTE, draw_edge_labels

__all__ = ["GalleryItem", "save_gallery"]

# (original, corrupted, mask) or (original, corrupted, mask, label)
GalleryItem = tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray, str]


def _show(ax, image: np.ndarray, vmin: float, vmax: float) -> None:
    # canonical (X, Y) slices in the project's convention (radiological: patient's right on the left)
    ax.imshow(axial_display(image), cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
    draw_edge_labels(ax, fontsize=5)
    ax.set_xticks([])
    ax.set_yticks([])


def save_gallery(
    path: str | Path,
    rows: Mapping[str, Sequence[GalleryItem]],
    *,
    title: str | None = None,
    panel_inches: float = 1.6,
    dpi: int = 100,
) -> Path:
    """Write a PNG: one row per key of ``rows``, three panels per item.

    Each item is ``(original, corrupted, mask[, label])`` (2D arrays of one shape); the
    panels are the original, the corrupted image and the corrupted image with the mask in
    red, each a canonical ``(X, Y)`` axial slice shown radiologically with R/L/A/P at its edges
    (:mod:`pseudohealthy.figures.orientation`; the convention is stated under the rows). Uses
    matplotlib's Agg canvas (no display needed). Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(rows)
    if not names or not any(len(rows[n]) for n in names):
        raise ValueError("the gallery has nothing to show")
    n_cols = 3 * max(len(rows[n]) for n in names)
    fig = Figure(figsize=(panel_inches * n_cols, panel_inches * len(names) + (0.4 if title else 0.1) + 0.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), n_cols, squeeze=False)
    for r, name in enumerate(names):
        for ax in axes[r]:
            ax.set_axis_off()
        for i, item in enumerate(rows[name]):
            original, corrupted, mask = (np.asarray(a) for a in item[:3])
            label = item[3] if len(item) > 3 else ""
            vmin, vmax = float(original.min()), float(original.max())
            a0, a1, a2 = axes[r, 3 * i : 3 * i + 3]
            for ax in (a0, a1, a2):
                ax.set_axis_on()
            _show(a0, original, vmin, vmax)
            _show(a1, corrupted, vmin, vmax)
            _show(a2, corrupted, vmin, vmax)
            shown = axial_display(mask.astype(bool))
            overlay = np.zeros((*shown.shape, 4), dtype=np.float32)
            overlay[shown] = (1.0, 0.1, 0.1, 0.45)
            a2.imshow(overlay, interpolation="nearest")
            a0.set_title(f"{label} original".strip(), fontsize=7)
            a1.set_title("corrupted", fontsize=7)
            a2.set_title("mask", fontsize=7)
            if i == 0:
                a0.set_ylabel(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.005, CONVENTION_NOTE, ha="center", va="bottom", fontsize=7, color="0.3", gid="convention")
    fig.tight_layout(rect=(0, 0.2 / fig.get_figheight(), 1, 1))
    return save_figure(fig, path, dpi=dpi)
