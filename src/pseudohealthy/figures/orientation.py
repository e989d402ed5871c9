"""The one display convention of the project: radiological, with the edges labelled.

Every picture the project shows (the napari canvas, restore previews, the synthetic-task gallery)
shows a canonical RAS+ slice as a radiologist reads it: axial slices with anterior up and the
patient's right on the screen's left; coronal with superior up and right on the left; sagittal
with superior up and anterior on the left. :data:`EDGE_LABELS` names the patient direction at each
screen edge, for the labels drawn on the canvas and in every PNG.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONVENTION", "EDGE_LABELS", "axial_display"]

CONVENTION = "radiological"
"""The display convention: the patient's right on the screen's left (as in PACS viewers)."""

EDGE_LABELS = {
    "axial": {"top": "A", "bottom": "P", "left": "R", "right": "L"},
    "coronal": {"top": "S", "bottom": "I", "left": "R", "right": "L"},
    "sagittal": {"top": "S", "bottom": "I", "left": "A", "right": "P"},
}
"""Patient direction at each screen edge, per plane (R/L, A/P, S/I)."""


def axial_display(image_xy: np.ndarray) -> np.ndarray:
    """A canonical RAS+ axial slice ``(X, Y)`` as displayed: rows from anterior (top) to posterior,
    columns from the patient's right (left of the screen) to the patient's left."""
    image = np.asarray(image_xy)
    return np.ascontiguousarray(image.T[::-1, ::-1])
