"""A PNG that shows a restoration at a glance: input, pseudo-healthy image and anomaly map."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pseudohealthy.data.files import atomic_write

__all__ = ["highest_scoring", "save_preview"]


def highest_scoring(slice_scores: Mapping[int, float], n: int = 4) -> list[int]:
    """The ``n`` highest-scoring slices, in axis order (evenly spread if scores tie)."""
    if not slice_scores:
        return []
    ranked = sorted(slice_scores, key=lambda k: (-slice_scores[k], k))
    return sorted(ranked[: max(1, n)])


def _oriented(image: np.ndarray) -> np.ndarray:
    """Canonical RAS+ axial slice -> radiological display (anterior up, patient right on the left)."""
    return np.rot90(image)


def save_preview(
    path: str | Path,
    scan: np.ndarray,
    pseudo_healthy: np.ndarray,
    anomaly: np.ndarray,
    slices: Sequence[int],
    *,
    lesion: np.ndarray | None = None,
    title: str = "",
    spacing: tuple[float, float] | None = None,
) -> Path:
    """Rows = ``slices`` of canonical ``(X, Y, Z)`` volumes; columns = input, restoration, map.

    ``lesion`` (optional, same shape) is outlined in every panel. ``spacing`` (x, y in mm) keeps
    the physical aspect ratio. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    slices = list(slices)
    if not slices:
        raise ValueError("no slices to show")
    inside = scan[..., slices]
    lo, hi = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
    vmax_map = max(float(np.percentile(anomaly[..., slices], 99.9)), 1e-6)
    aspect = 1.0 if spacing is None else spacing[0] / spacing[1]
    cols = ("input", "pseudo-healthy", "anomaly map (1 - SSIM)")
    fig, axes = plt.subplots(len(slices), 3, figsize=(9, 3 * len(slices)), squeeze=False)
    for r, k in enumerate(slices):
        for c, (image, kw) in enumerate(
            (
                (scan[..., k], {"cmap": "gray", "vmin": lo, "vmax": hi}),
                (pseudo_healthy[..., k], {"cmap": "gray", "vmin": lo, "vmax": hi}),
                (anomaly[..., k], {"cmap": "inferno", "vmin": 0.0, "vmax": vmax_map}),
            )
        ):
            ax = axes[r, c]
            ax.imshow(_oriented(image), aspect=aspect, interpolation="nearest", **kw)
            if lesion is not None and lesion[..., k].any():
                ax.contour(_oriented(lesion[..., k] > 0), levels=[0.5], colors="cyan", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=10)
            if c == 0:
                ax.set_ylabel(f"slice {k}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        path = atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    finally:
        plt.close(fig)
    return path
