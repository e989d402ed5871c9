"""Anomaly maps (1 - SSIM), ensemble means and slice/volume scores."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity

from pseudohealthy.engine.maps import (
    WIN_SIZE,
    anomaly_map,
    ensemble_map,
    foreground_mean,
    format_score,
    member_disagreement,
    slice_scores,
    volume_score,
)


def _brain(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured disc on a zero background, values in [0, 1], and its foreground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n]
    fg = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.4 * n) ** 2
    img = np.clip(0.5 + 0.2 * gaussian_filter(rng.standard_normal((n, n)), 1.5), 0, 1) * fg
    return img.astype(np.float32), fg


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Wang et al. (2004) SSIM map written out with an 11-tap (sigma 1.5) Gaussian, zero padding."""
    x, y = x.astype(np.float64), y.astype(np.float64)

    def blur(a):
        return gaussian_filter(a, sigma=1.5, truncate=3.5, mode="constant", cval=0.0)

    mx, my = blur(x), blur(y)
    vx, vy, vxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return (2 * mx * my + c1) * (2 * vxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def test_window_is_11_taps():
    assert WIN_SIZE == 11


def test_identical_images_give_zero_map():
    img, fg = _brain()
    for faithful in (False, True):
        m = anomaly_map(img, img, fg, faithful=faithful)
        assert m.dtype == np.float32 and m.shape == img.shape
        assert np.abs(m).max() < 1e-5


def test_map_in_unit_range_and_zero_outside_foreground():
    img, fg = _brain()
    rng = np.random.default_rng(1)
    restoration = rng.random(img.shape).astype(np.float32)  # very different: SSIM can go negative
    m = anomaly_map(restoration, img, fg, faithful=False)
    assert m.min() >= 0.0 and m.max() <= 1.0
    assert np.all(m[~fg] == 0)
    assert m[fg].mean() > 0.3


def test_matches_written_out_ssim_with_unit_and_faithful_constants():
    img, fg = _brain()
    restoration = img.copy()
    restoration[18:30, 18:30] = 0.9
    for faithful, data_range in ((False, 1.0), (True, 255.0)):
        expected = np.clip(1 - _ssim_reference(restoration, img, data_range), 0, 1) * fg
        np.testing.assert_allclose(anomaly_map(restoration, img, fg, faithful=faithful), expected, atol=1e-5)


def test_borders_are_zero_padded_as_the_reference():
    """Where the image touches the border, the map is the zero-padded formula's, not a reflected one."""
    rng = np.random.default_rng(3)
    img = np.clip(0.6 + 0.1 * rng.standard_normal((32, 32)), 0, 1).astype(np.float32)
    restoration = img.copy()
    restoration[:, :4] = 0.2  # a difference along the left border
    fg = np.ones(img.shape, bool)
    got = anomaly_map(restoration, img, fg, faithful=False)
    np.testing.assert_allclose(got, np.clip(1 - _ssim_reference(restoration, img, 1.0), 0, 1), atol=1e-5)
    x, y = restoration.astype(np.float64), img.astype(np.float64)
    _, reflected = structural_similarity(
        x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, full=True
    )
    assert np.abs(got - np.clip(1 - reflected, 0, 1)).max() > 1e-3  # the padding is visible there


def test_map_is_high_where_the_restoration_differs():
    img, fg = _brain()
    restoration = img.copy()
    restoration[20:28, 20:28] = 0.1  # a "lesion" that the restoration removed
    far = fg & (np.abs(np.mgrid[:48, :48] - 24).max(0) > 12)
    for faithful in (False, True):
        m = anomaly_map(restoration, img, fg, faithful=faithful)
        assert m[22:26, 22:26].mean() > 10 * m[far].mean()


def test_faithful_constants_on_flat_regions():
    img = np.full((40, 40), 0.6, dtype=np.float32)
    restoration = np.full((40, 40), 0.5, dtype=np.float32)
    fg = np.ones_like(img, dtype=bool)
    unit = anomaly_map(restoration, img, fg, faithful=False)[20, 20]
    faithful = anomaly_map(restoration, img, fg, faithful=True)[20, 20]
    # flat: only the luminance term, 1 - (2ab + C1) / (a^2 + b^2 + C1) = (a - b)^2 / (a^2 + b^2 + C1)
    assert unit == pytest.approx(0.01 / (0.61 + 1e-4), rel=1e-4)
    assert faithful == pytest.approx(0.01 / (0.61 + (0.01 * 255) ** 2), rel=1e-4)
    assert faithful < unit / 10


def test_default_constants_are_the_references():
    """The default map (and the restore settings') uses data range 255, as the reference release."""
    from pseudohealthy.engine.settings import RestoreSettings

    img, fg = _brain()
    restoration = img.copy()
    restoration[18:30, 18:30] = 0.9
    expected = np.clip(1 - _ssim_reference(restoration, img, 255.0), 0, 1) * fg
    np.testing.assert_allclose(anomaly_map(restoration, img, fg), expected, atol=1e-6)
    assert RestoreSettings().faithful_ssim is True


def test_faithful_constants_hide_texture_changes_at_equal_mean():
    img, fg = _brain(seed=2)
    other, _ = _brain(seed=3)  # same mean level, different texture
    unit = anomaly_map(other, img, fg, faithful=False)
    faithful = anomaly_map(other, img, fg, faithful=True)
    assert unit[fg].mean() > 0.2
    assert faithful[fg].mean() < 1e-3


def test_stack_of_slices_equals_slice_by_slice_and_none_foreground():
    a, _ = _brain(seed=4)
    b, _ = _brain(seed=5)
    rest = np.stack([b, a])
    imgs = np.stack([a, b])
    stacked = anomaly_map(rest, imgs, None)  # None: image > 0
    assert stacked.shape == (2, 48, 48)
    np.testing.assert_array_equal(stacked[0], anomaly_map(b, a, a > 0))
    np.testing.assert_array_equal(stacked[1], anomaly_map(a, b, b > 0))
    assert np.all(stacked[0][a <= 0] == 0)


def test_bad_inputs():
    img, fg = _brain()
    with pytest.raises(ValueError, match="differs"):
        anomaly_map(img[:40], img, fg)
    with pytest.raises(ValueError, match="window"):
        anomaly_map(img[:8, :8], img[:8, :8], fg[:8, :8])
    with pytest.raises(ValueError, match="foreground"):
        anomaly_map(img, img, fg[:40])


def test_ensemble_map_mean_and_rezeroed():
    fg = np.zeros((2, 8, 8), dtype=bool)
    fg[:, 2:6, 2:6] = True
    members = np.stack([np.full((2, 8, 8), 0.2), np.full((2, 8, 8), 0.6), np.full((2, 8, 8), 0.4)])
    m = ensemble_map(members, fg)
    assert m.dtype == np.float32
    np.testing.assert_allclose(m[fg], 0.4, atol=1e-7)
    assert np.all(m[~fg] == 0)
    np.testing.assert_allclose(ensemble_map(members), 0.4, atol=1e-7)
    with pytest.raises(ValueError):
        ensemble_map(members, fg[0])


def test_slice_and_volume_scores():
    maps = np.zeros((3, 4, 4), dtype=np.float32)
    maps[1, :2] = 1.0  # half the slice
    maps[2, 0, 0] = 0.8
    np.testing.assert_allclose(slice_scores(maps), [0.0, 0.5, 0.05])
    assert slice_scores(maps[1]).shape == (1,)
    fg = np.zeros_like(maps, dtype=bool)
    fg[1] = True
    assert foreground_mean(maps, fg) == pytest.approx(0.5)
    assert foreground_mean(maps) == pytest.approx((8 + 0.8) / 48)
    assert foreground_mean(maps, np.zeros_like(fg)) == 0.0
    assert volume_score(slice_scores(maps)) == pytest.approx((0.0 + 0.5 + 0.05) / 3)
    assert volume_score([]) is None


def test_member_disagreement_is_the_spread_of_the_member_maps():
    members = np.stack([np.full((2, 4, 4), v, dtype=np.float32) for v in (0.1, 0.3, 0.5)])
    fg = np.ones((2, 4, 4), dtype=bool)
    fg[:, 0] = False
    spread = member_disagreement(members, fg)
    np.testing.assert_allclose(spread[fg], np.std([0.1, 0.3, 0.5]), rtol=1e-5)
    assert not spread[~fg].any()
    assert not member_disagreement(members[:1]).any()  # one member: no disagreement
    with pytest.raises(ValueError):
        member_disagreement(np.zeros(3))


def test_display_range_follows_the_map_at_both_scales():
    """0 .. the 99.5th percentile of the map over its foreground, for maps of either constants."""
    from pseudohealthy.figures.ranges import display_range

    img, fg = _brain()
    restoration = img.copy()
    restoration[18:30, 18:30] = 0.9
    maps = {f: anomaly_map(restoration, img, fg, faithful=f) for f in (False, True)}
    for m in maps.values():
        lo, hi = display_range(m, fg)
        assert lo == 0.0 and hi == pytest.approx(np.percentile(m[fg].astype(np.float64), 99.5))
        assert 0 < hi <= m.max()
        # None: the map's positive pixels (0 outside the brain and on slices not restored)
        assert display_range(m)[1] == pytest.approx(np.percentile(m[m > 0].astype(np.float64), 99.5))
        # the range scales with the map
        assert display_range(m * 1e-3, fg)[1] == pytest.approx(hi * 1e-3, rel=1e-6)
    assert display_range(maps[True], fg)[1] < display_range(maps[False], fg)[1] / 10
    # non-finite values are ignored; an empty map gets (0, 1)
    with_nan = maps[True].copy()
    with_nan[0, 0] = np.nan
    assert display_range(with_nan)[1] == pytest.approx(display_range(maps[True])[1], rel=1e-3)
    assert display_range(np.zeros((8, 8))) == (0.0, 1.0)
    assert display_range(np.full((8, 8), np.nan)) == (0.0, 1.0)


def test_a_faithful_ensembles_small_score_is_printed_with_its_digits():
    assert format_score(1.234e-4) == "0.000123"  # not "0.0000", as the preview title once said
    assert format_score(0.4567) == "0.457"
