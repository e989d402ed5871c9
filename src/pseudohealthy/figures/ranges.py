"""The display range of a map (anomaly or uncertainty): taken from the map itself, never [0, 1].

One rule for every display: the viewer's colour limits and threshold slider
(:mod:`pseudohealthy.napari`) and the PNG previews (:mod:`.preview`). Maps with the reference's
SSIM constants (the default, :data:`~pseudohealthy.engine.defaults.FAITHFUL_SSIM`) are of order
1e-3, maps with data range 1 span [0, 1]: both look alike this way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DISPLAY_PERCENTILE", "display_range"]

DISPLAY_PERCENTILE = 99.5
"""The top of a map's display range: this percentile of the map over its foreground."""


def display_range(
    values: np.ndarray, foreground: np.ndarray | None = None, *, percentile: float = DISPLAY_PERCENTILE
) -> tuple[float, float]:
    """``(0, hi)``: the range to show a map (anomaly or uncertainty) in, from the map itself.

    ``hi`` is the ``percentile`` of the finite map values inside ``foreground`` (``None``: the
    map's positive values, as maps are 0 outside the brain and on slices not restored); the
    largest such value when that percentile is 0, and 1 when there is none (an empty map). The one
    rule of the viewer's colour limits and threshold slider and of the PNG previews.
    """
    arr = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(arr) & (arr > 0 if foreground is None else np.asarray(foreground, dtype=bool))
    inside = arr[keep]
    hi = float(np.percentile(inside, percentile)) if inside.size else 0.0
    if not hi > 0 and inside.size:
        hi = float(inside.max())
    return 0.0, hi if hi > 0 else 1.0
