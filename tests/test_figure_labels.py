"""PNG figures in the project's one display convention: radiological, edges labelled R/L/A/P."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from pseudohealthy.figures import gallery, preview
from pseudohealthy.figures.orientation import CONVENTION, EDGE_LABELS

BRAIN, ANTERIOR, RIGHT = 0.4, 0.7, 1.0


def _volume() -> np.ndarray:
    """Canonical RAS+ (X, Y, Z): a box of brain, a bright marker in the patient's right (high x)
    and a mid-grey one anterior (high y), both away from the other axis' middle."""
    vol = np.zeros((60, 80, 3), np.float32)
    vol[8:52, 8:72] = BRAIN
    vol[44:50, 36:44] = RIGHT  # the patient's right, mid-way front to back
    vol[26:34, 62:70] = ANTERIOR  # anterior, mid-way left to right
    return vol


@pytest.fixture
def captured(monkeypatch) -> list:
    """The figures the writers save (their axes' final positions give the panels in the PNG)."""
    figures: list = []

    def keep(save):
        def save_and_keep(fig, path, **kwargs):
            figures.append(fig)
            return save(fig, path, **kwargs)

        return save_and_keep

    monkeypatch.setattr(preview, "save_figure", keep(preview.save_figure))
    monkeypatch.setattr(gallery, "save_figure", keep(gallery.save_figure))
    return figures


def _panel(pixels: np.ndarray, ax) -> np.ndarray:
    """The part of the saved image inside ``ax`` (figure fractions -> pixel rows and columns)."""
    h, w = pixels.shape[:2]
    box = ax.get_position()
    rows = slice(int(np.ceil((1 - box.y1) * h)) + 1, int((1 - box.y0) * h) - 1)
    cols = slice(int(np.ceil(box.x0 * w)) + 1, int(box.x1 * w) - 1)
    return pixels[rows, cols, :3]


def _centre(panel: np.ndarray, value: float) -> tuple[float, float]:
    """Mean (row, column) of the grey pixels of ``value``, as fractions of the panel's size."""
    grey = (np.ptp(panel, axis=2) < 0.03) & (np.abs(panel.mean(axis=2) - value) < 0.04)
    assert grey.sum() > 10, value
    rows, cols = np.nonzero(grey)
    return rows.mean() / panel.shape[0], cols.mean() / panel.shape[1]


def _check_labels(fig, axes) -> None:
    for ax in axes:
        labels = {t.get_gid(): t.get_text() for t in ax.texts if (t.get_gid() or "").startswith("edge-")}
        assert labels == {f"edge-label-{edge}": text for edge, text in EDGE_LABELS["axial"].items()}
    notes = [t.get_text() for t in fig.texts if t.get_gid() == "convention"]
    assert len(notes) == 1 and CONVENTION in notes[0] and "right (R) on the image's left" in notes[0]


def test_preview_is_radiological_and_labelled(tmp_path: Path, captured: list) -> None:
    vol = _volume()
    path = preview.save_preview(
        tmp_path / "p.png", vol, vol, vol * 0.5, [1], uncertainty=vol * 0.1, title="t", spacing=(1.0, 1.0)
    )
    (fig,) = captured
    axes = fig.axes
    assert [ax.get_title().split(" (")[0] for ax in axes] == [
        "input",
        "pseudo-healthy",
        "anomaly map",
        "uncertainty",
    ]
    _check_labels(fig, axes)
    pixels = imread(path)
    for ax in axes[:2]:  # the grey panels: input and pseudo-healthy
        panel = _panel(pixels, ax)
        row, col = _centre(panel, RIGHT)
        assert col < 0.4 and 0.3 < row < 0.7  # the patient's right: on the left of the panel
        row, col = _centre(panel, ANTERIOR)
        assert row < 0.35 and 0.3 < col < 0.7  # anterior: at the top
    # the physical aspect: 60 x 80 voxels of 2 x 1 mm are shown 80 px high, 120 px wide
    preview.save_preview(tmp_path / "q.png", vol, vol, vol, [1], spacing=(2.0, 1.0))
    box = captured[-1].axes[0].get_window_extent()
    assert box.width / box.height == pytest.approx(120 / 80, rel=0.03)


def test_gallery_is_radiological_and_labelled(tmp_path: Path, captured: list) -> None:
    image = _volume()[..., 1]
    mask = np.zeros(image.shape, bool)
    mask[44:50, 36:44] = True  # over the right-hand marker
    path = gallery.save_gallery(tmp_path / "g.png", {"sink": [(image, image, mask, "z1")]}, title="g")
    (fig,) = captured
    _check_labels(fig, fig.axes)
    pixels = imread(path)
    for ax in fig.axes[:2]:  # original and corrupted
        panel = _panel(pixels, ax)
        assert _centre(panel, RIGHT)[1] < 0.4
        assert _centre(panel, ANTERIOR)[0] < 0.35
    # the mask overlay (red) lands on the marker, in the left half too
    panel = _panel(pixels, fig.axes[2])
    red = (panel[..., 0] - panel[..., 1]) > 0.3
    assert red.any() and np.nonzero(red)[1].mean() / panel.shape[1] < 0.4


def test_preview_colour_limits_follow_the_map(tmp_path: Path, captured: list) -> None:
    """The maps' colour limits come from the maps: a map (and uncertainty) 1000 times smaller,
    as the reference's SSIM constants give, draws the same PNG up to rounding."""
    from pseudohealthy.figures.ranges import display_range

    vol = _volume()
    rng = np.random.default_rng(0)
    amap = (rng.random(vol.shape) * 0.2 * (vol > 0)).astype(np.float32)
    amap[20:30, 20:30] += 0.6  # a lesion
    spread = (amap * 0.3).astype(np.float32)
    paths = []
    for scale in (1.0, 1e-3):
        paths.append(
            preview.save_preview(
                tmp_path / f"p{scale}.png", vol, vol, amap * scale, [0, 2], uncertainty=spread * scale
            )
        )
        # the map panels' limits are 0 .. the 99.5th percentile of the shown slices' positive values
        shown = (amap * scale)[..., [0, 2]]
        hi = np.percentile(shown[shown > 0].astype(np.float64), 99.5)
        image = captured[-1].axes[2].images[0]
        assert image.get_clim() == pytest.approx((0.0, hi), rel=1e-6)
        assert image.get_clim()[1] == pytest.approx(display_range(shown)[1], rel=1e-9)
    small, large = (imread(p) for p in paths)
    assert small.shape == large.shape
    diff = np.abs(small.astype(np.float64) - large.astype(np.float64))
    assert diff.max() <= 2 / 255 and (diff > 0).mean() < 1e-3
