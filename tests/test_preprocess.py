"""preprocess.py: foreground, normalisation, slice geometry and the model-frame round trip."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import phantom
from pseudohealthy.data.io import load_mask, load_scan, volume_from_array
from pseudohealthy.data.preprocess import (
    MAX_IMAGE_SIZE,
    MEDIAN_SPAN,
    MIN_IMAGE_SIZE,
    NORMS,
    OUTLIER_FACTOR,
    ImageSizeError,
    NormParams,
    SliceGeometry,
    background_value,
    check_image_size,
    foreground_mask,
    norm_params,
    normalise,
    outlier_maximum,
    prepare_scan,
)
from pseudohealthy.errors import ScanError, ScanWarning

BRATS = "lesion/brats2013/brats_2013_pat0003_1"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def brats(shared_data):
    vol = load_scan(shared_data / BRATS / "Flair_subtrMeanDivStd.nii.gz")
    return vol, load_mask(shared_data / BRATS / "brainmask.nii.gz", vol)


@pytest.fixture(scope="module")
def mslub_t1(shared_data):
    return load_scan(shared_data / "lesion/mslub/patient07/T1.nii.gz")


def test_foreground_matches_brats_brainmask(brats):
    vol, brain = brats
    assert vol.data.min() < 0  # z-scored, negative constant background
    fg = foreground_mask(vol.data)
    assert _dice(fg, brain) > 0.95
    assert background_value(vol.data) == pytest.approx(float(vol.data.min()))


def test_foreground_keeps_negative_brain_voxels_mslub(mslub_t1):
    data = mslub_t1.data
    fg = foreground_mask(data)
    negative = data < 0
    assert negative.sum() > 100  # bias-corrected: small negative values inside the brain
    assert fg[negative].mean() > 0.99
    assert background_value(data) == 0.0
    assert not fg[data == 0].any()  # the zero background is not foreground
    assert 0.05 < fg.mean() < 0.4


def test_foreground_min_rule_and_explicit_mask():
    img = phantom((24, 24, 6), background=-2.0)
    fg = foreground_mask(img)
    np.testing.assert_array_equal(fg, img > -2.0)
    box = np.zeros(img.shape, bool)
    box[4:10, 4:10] = True
    np.testing.assert_array_equal(foreground_mask(img, box), box)
    with pytest.raises(ValueError, match="shape"):
        foreground_mask(img, box[:-1])


@pytest.mark.parametrize("method", NORMS)
def test_normalise_range(brats, method):
    vol, _ = brats
    fg = foreground_mask(vol.data)
    out = normalise(vol.data, fg, method)
    assert out.dtype == np.float32 and out.shape == vol.data.shape
    assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
    assert not out[~fg].any()
    positive = out[out > 0]
    assert positive.min() >= 1e-4
    if method == "max":  # monotone linear map inside the foreground
        order = np.argsort(vol.data[fg])
        assert np.all(np.diff(out[fg][order]) >= 0)
    elif method == "percentile":  # clipped at the 1st and 99th percentiles
        assert np.mean(out[fg] == 1.0) == pytest.approx(0.01, abs=0.005)
    else:  # the foreground median at 1 / MEDIAN_SPAN, the background at 0, a few bright voxels clipped
        assert np.median(out[fg]) == pytest.approx(1 / MEDIAN_SPAN, abs=1e-3)
        assert 0 < np.mean(out[fg] == 1.0) < 0.001


def test_median_normalisation_ignores_the_bright_end(brats):
    """Clipping a scan's brightest voxels moves the "max" map of all the rest, not the "median" one."""
    vol, _ = brats
    fg = foreground_mask(vol.data)
    clipped = np.minimum(vol.data, np.float32(5.0))  # 0.1 % of the foreground of patient 0003
    below = fg & (vol.data < 5.0)
    same = normalise(vol.data, fg, "median")[below], normalise(clipped, fg, "median")[below]
    np.testing.assert_array_equal(*same)
    moved = normalise(vol.data, fg, "max")[below], normalise(clipped, fg, "max")[below]
    assert np.median(moved[1] - moved[0]) > 0.05


def test_normalise_max_formula():
    data = np.array([[-3.0, -3.0, -1.0], [1.0, 5.0, -3.0]], dtype=np.float32)
    out = normalise(data, foreground_mask(data))
    np.testing.assert_allclose(out, (data + 3.0) / 8.0)
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(data, data > -3, "zscore")


@pytest.mark.parametrize("square", ["pad", "crop"])
@pytest.mark.parametrize("shape", [(33, 20), (20, 33), (32, 32), (31, 31), (48, 40)])
@pytest.mark.parametrize("size", [16, 64])
def test_geometry_shapes(shape, size, square):
    geom = SliceGeometry(shape, size, square)
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    model = geom.to_model(img)
    assert model.shape == (size, size) and model.dtype == np.float32
    assert geom.from_model(model).shape == shape
    stack = geom.to_model(np.stack([img, img * 0.5]))
    assert stack.shape == (2, size, size)
    np.testing.assert_allclose(stack[0], model, atol=1e-6)
    np.testing.assert_allclose(stack[1], model * 0.5, atol=1e-6)
    assert geom.from_model(stack).shape == (2, *shape)
    mask = geom.to_model(img > 0.5)
    assert mask.dtype == bool and mask.shape == (size, size)


@pytest.mark.parametrize("square", ["pad", "crop"])
@pytest.mark.parametrize(("shape", "size"), [((60, 44), 32), ((45, 45), 32), ((30, 21), 64)])
def test_geometry_round_trip_smooth(shape, size, square):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    blob = np.exp(-(((yy - cy) / (0.25 * shape[0])) ** 2) - ((xx - cx) / (0.25 * shape[1])) ** 2)
    geom = SliceGeometry(shape, size, square)
    back = geom.from_model(geom.to_model(blob), fill=-1.0)
    side = min(shape)
    inside = np.zeros(shape, bool)
    oy, ox = (shape[0] - side) // 2, (shape[1] - side) // 2
    inside[oy : oy + side, ox : ox + side] = True
    region = inside if square == "crop" else np.ones(shape, bool)
    assert np.abs(back - blob)[region].max() < 0.03
    if square == "crop":
        assert np.all(back[~inside] == -1.0)


def test_geometry_pad_centres_and_crop_keeps_centre():
    img = np.zeros((10, 4), np.float32)
    img[:, :] = 1.0
    padded = SliceGeometry((10, 4), 10, "pad").to_model(img)
    np.testing.assert_array_equal(padded[:, 3:7], 1.0)
    np.testing.assert_array_equal(padded[:, :3], 0.0)
    np.testing.assert_array_equal(padded[:, 7:], 0.0)
    img = np.arange(40, dtype=np.float32).reshape(10, 4)
    cropped = SliceGeometry((10, 4), 4, "crop").to_model(img)
    np.testing.assert_array_equal(cropped, img[3:7])
    with pytest.raises(ValueError, match="square"):
        SliceGeometry((10, 4), 4, "stretch")


def test_prepare_scan_real(brats):
    vol, _ = brats
    prep = prepare_scan(vol, size=64)
    n = len(prep.indices)
    assert prep.images.shape == (n, 64, 64) and prep.images.dtype == np.float32
    assert prep.masks.shape == (n, 64, 64) and prep.masks.dtype == bool
    assert prep.images.min() >= 0.0 and prep.images.max() <= 1.0
    # only slices with >= 1% foreground pixels, and all of them
    counts = prep.foreground.sum(axis=(0, 1))
    need = 0.01 * vol.data.shape[0] * vol.data.shape[1]
    np.testing.assert_array_equal(prep.indices, np.flatnonzero(counts >= need))
    assert 0 < n < vol.data.shape[2]
    assert prep.masks.reshape(n, -1).any(axis=1).all()
    # model-frame masks match the model-frame images: foreground where the image is bright
    assert prep.images[~prep.masks].mean() < 0.1 * prep.images[prep.masks].mean()
    # back into the canonical grid: close to the normalised volume inside the foreground
    back = prep.to_volume(prep.images, fill=-1.0)
    assert back.shape == vol.data.shape
    missing = np.setdiff1d(np.arange(vol.data.shape[2]), prep.indices)
    assert np.all(back[:, :, missing] == -1.0)
    used = np.zeros_like(prep.foreground)
    used[:, :, prep.indices] = True
    err = np.abs(back - prep.normalised)[prep.foreground & used]
    assert err.mean() < 0.03
    assert np.percentile(err, 95) < 0.1
    masks_back = prep.to_volume(prep.masks)
    assert masks_back.dtype == bool
    assert _dice(masks_back[:, :, prep.indices], prep.foreground[:, :, prep.indices]) > 0.95


def test_prepare_scan_min_foreground_and_brain_mask(brats):
    vol, brain = brats
    loose = prepare_scan(vol, size=32, min_foreground=1)
    strict = prepare_scan(vol, size=32, min_foreground=0.2)
    assert set(strict.indices) < set(loose.indices)
    np.testing.assert_array_equal(loose.indices, np.flatnonzero(loose.foreground.any(axis=(0, 1))))
    masked = prepare_scan(vol, size=32, brain_mask=brain)
    np.testing.assert_array_equal(masked.foreground, brain)


def test_prepare_scan_crop_mode():
    vol = volume_from_array(phantom((40, 30, 8)))
    prep = prepare_scan(vol, size=16, square="crop")
    assert prep.geometry.square == "crop" and prep.images.shape[1:] == (16, 16)
    back = prep.to_volume(prep.images, fill=0.5)
    assert np.all(back[:5] == 0.5) and np.all(back[-5:] == 0.5)  # outside the centred 30x30 crop
    assert np.all(back[5:-5, :, prep.indices] != 0.5)


def test_prepare_scan_without_foreground_slices():
    data = np.zeros((20, 20, 4), np.float32)
    data[10, 10, 2] = 1.0
    with pytest.raises(ScanError, match="no axial slice"):
        prepare_scan(volume_from_array(data), size=16, min_foreground=0.05)


@pytest.mark.parametrize("norm", NORMS)
def test_denormalise_inverts_normalise(mslub_t1, norm):
    prep = prepare_scan(mslub_t1, size=32, norm=norm)
    data = mslub_t1.data
    back = prep.denormalise(prep.normalised)
    kept = prep.normalised > 0 if norm == "max" else (prep.normalised > 0) & (prep.normalised < 1)
    assert kept.sum() > 0.9 * prep.foreground.sum()
    scale = float(data.max() - data.min())
    np.testing.assert_allclose(back[kept], data[kept], atol=1e-5 * scale)
    np.testing.assert_array_equal(back[~prep.foreground], 0.0)  # MSLUB's background value
    # on model-frame arrays it is the plain linear inverse
    lo, hi = prep.norm.lo, prep.norm.hi
    np.testing.assert_allclose(
        prep.denormalise(prep.images), prep.images * (hi - lo) + lo, rtol=1e-5, atol=1e-3
    )


# ---- sizes, wide intensity ranges, outliers -----------------------------------------------------


def test_check_image_size():
    assert check_image_size(MIN_IMAGE_SIZE) == MIN_IMAGE_SIZE
    assert check_image_size(np.int64(MAX_IMAGE_SIZE)) == MAX_IMAGE_SIZE
    for bad in (MIN_IMAGE_SIZE - 1, MAX_IMAGE_SIZE + 1, 100000, True, 64.0):
        with pytest.raises(ImageSizeError, match=f"--size must be an image size from {MIN_IMAGE_SIZE} to"):
            check_image_size(bad, "--size")


def test_geometry_refuses_sizes_above_the_limit_before_allocating():
    with pytest.raises(ImageSizeError, match="above the limit"):
        SliceGeometry((10, 10), 100000)
    with pytest.raises(ImageSizeError):
        prepare_scan(volume_from_array(phantom()), size=100000)


def test_normalisation_of_ordinary_ranges_is_float32_as_before():
    data = phantom() * 1000 - 3
    fg = foreground_mask(data)
    params = norm_params(data, fg)
    old = (data - np.float32(params.lo)) / np.float32(params.hi - params.lo)  # the float32 formula
    old = np.clip(old, 0.0, 1.0)
    old[old < 1e-4] = 0.0
    old[~fg] = 0.0
    np.testing.assert_array_equal(params.apply(data, fg), old)
    arr = np.linspace(0, 1, 11, dtype=np.float32)
    expected = (arr * np.float32(params.hi - params.lo) + np.float32(params.lo)).astype(np.float32)
    np.testing.assert_array_equal(params.invert(arr), expected)


@pytest.mark.parametrize("method", NORMS)
def test_normalisation_near_the_float32_limit_is_finite(method, recwarn):
    ph = phantom().astype(np.float64)
    data = (ph / ph.max() * 6e38 - 3e38).astype(np.float32)
    prep = prepare_scan(volume_from_array(data), size=16, norm=method)
    assert np.isfinite(prep.normalised).all() and np.isfinite(prep.images).all()
    top = prep.normalised.max()  # "median" reaches 1 only above MEDIAN_SPAN times the median's level
    assert top == 1.0 if method != "median" else 0.3 < top <= 1.0
    assert prep.normalised[prep.foreground].min() >= 0.0
    assert np.isfinite(prep.denormalise(prep.normalised)).all()
    assert np.isfinite(prep.norm.invert(np.array([0.0, 1.0], np.float32))).all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_unusable_normalisation_is_a_scan_error(monkeypatch):
    import pseudohealthy.data.preprocess as pre

    monkeypatch.setattr(pre, "norm_params", lambda *a, **k: NormParams("max", 0.0, np.nan, 0.0))
    with pytest.raises(ScanError, match="normalisation is not finite"):
        prepare_scan(volume_from_array(phantom()), size=16)


def test_outlier_rule():
    data = phantom() * np.float32(4.5 / phantom().max())
    fg = foreground_mask(data)
    assert outlier_maximum(data[fg], 0.0) is None
    data[16, 16, 6] = 100.0
    top, p, ratio = outlier_maximum(data[foreground_mask(data)], 0.0)
    assert top == 100.0 and 4.0 < p <= 4.5 and ratio > OUTLIER_FACTOR
    assert outlier_maximum(np.zeros(0, np.float32), 0.0) is None
    assert outlier_maximum(np.zeros(10, np.float32), 0.0) is None  # no spread: no rule


def test_outlier_warning_only_for_divide_by_maximum(recwarn):
    data = phantom() * np.float32(4.5 / phantom().max())
    data[16, 16, 6] = 100.0
    vol = volume_from_array(data, name="spiky")
    with pytest.warns(ScanWarning, match=r"spiky: the maximum 100 lies .*norm='percentile'"):
        prepare_scan(vol, size=16)
    recwarn.clear()
    prepare_scan(vol, size=16, norm="percentile")
    assert not [w for w in recwarn if issubclass(w.category, ScanWarning)]


def test_no_outlier_warning_on_real_scans(brats, mslub_t1, recwarn):
    prepare_scan(brats[0], size=32)
    prepare_scan(mslub_t1, size=32)
    assert not [w for w in recwarn if issubclass(w.category, ScanWarning)]


def test_outlier_that_hides_the_foreground_is_named():
    data = phantom()
    data[16, 16, 6] = 1e30
    with pytest.raises(ScanError, match=r"no axial slice .*maximum 1e\+30 lies .*outlier voxel"):
        prepare_scan(volume_from_array(data), size=16)
    data[16, 16, 6] = 0.0
    data[np.abs(data) > 0] = 0.0
    data[10, 10, 2] = 1.0  # a plain empty scan keeps the plain message
    with pytest.raises(ScanError, match=r"foreground pixels$"):
        prepare_scan(volume_from_array(data), size=16, min_foreground=0.05)
