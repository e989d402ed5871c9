"""The display convention: radiological axial slices, labelled edges."""

from __future__ import annotations

import numpy as np

from pseudohealthy.figures.orientation import CONVENTION, EDGE_LABELS, axial_display


def test_axial_display_is_radiological() -> None:
    # canonical RAS+: x grows to the patient's right, y to anterior
    image = np.zeros((5, 4))
    image[4, 0] = 1.0  # the patient's far right, posterior
    image[0, 3] = 2.0  # the patient's far left, anterior
    shown = axial_display(image)
    assert shown.shape == (4, 5)
    assert shown[-1, 0] == 1.0  # bottom (posterior), left of the screen (patient's right)
    assert shown[0, -1] == 2.0  # top (anterior), right of the screen (patient's left)
    assert CONVENTION == "radiological"
    assert EDGE_LABELS["axial"] == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
