"""The evaluation frame (model vs native), its rules, and the fidelity measures of evaluate."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.metrics import structural_similarity
from skimage.transform import resize
from sklearn.metrics import average_precision_score, roc_auc_score

import pseudohealthy.evaluation.frame as frame
from conftest import phantom, write_nifti
from pseudohealthy.cli import main
from pseudohealthy.data.io import volume_from_array
from pseudohealthy.data.preprocess import foreground_mask
from pseudohealthy.engine.settings import RestoreSettings
from pseudohealthy.evaluation.fidelity import Fidelity
from pseudohealthy.evaluation.pooling import EvalEntry, evaluate_maps

SHAPE = (64, 64, 8)
SIZE = 32


def _case(shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A phantom brain with a bright blob: (image, lesion)."""
    image = phantom(shape, seed=seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centre = (shape[0] * 0.42, shape[1] * 0.55, shape[2] * 0.5)
    lesion = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, (8, 7, 2.5), strict=True)) < 1
    image[lesion] += 0.3
    return image, lesion


def _prepared(image: np.ndarray, square: str = "crop", size: int = SIZE) -> frame.FrameRestoration:
    """The model-frame input of every slice, nothing restored (no network: no slice asked for)."""
    ensemble = SimpleNamespace(image_size=size, members=[])
    settings = RestoreSettings(square=square)
    return frame.restore_frames(volume_from_array(image), ensemble, settings, slices=[])


def _restored(image: np.ndarray, lesion: np.ndarray, square: str = "crop") -> frame.FrameRestoration:
    """A fake restoration: the map is the framed lesion blurred plus noise, on slices with input."""
    fr = _prepared(image, square)
    rng = np.random.default_rng(1)
    framed = frame.to_frame(lesion, np.arange(image.shape[2]), fr.geometry)
    fr.maps = np.clip(gaussian_filter(framed, (0, 1.5, 1.5)) + 0.2 * rng.random(framed.shape), 0, 1)
    fr.maps = fr.maps.astype(np.float32)
    fr.restorations = np.clip(fr.images + 0.05 * rng.standard_normal(fr.images.shape), 0, 1)
    fr.restorations = fr.restorations.astype(np.float32)
    fr.restored = np.flatnonzero(fr.images.any(axis=(1, 2)))
    return fr


def test_rules_and_defaults():
    assert frame.DEFAULT_FRAME == "model" and frame.resolve_rules() == frame.REFERENCE_RULES
    assert frame.REFERENCE_RULES.square == "crop" and frame.REFERENCE_RULES.min_foreground == 0
    assert frame.resolve_rules(reused=True) == frame.NATIVE_RULES
    assert frame.resolve_rules("model", "pad").square == "pad"
    with pytest.raises(ValueError, match="foreground"):
        frame.FrameRules(foreground="halo")
    fg = np.zeros((10, 10, 5), bool)
    fg[:, :, 2] = True
    fg[0, 0, 3] = True  # 1% of the slice
    assert frame.evaluated_slices(fg, frame.REFERENCE_RULES).tolist() == [0, 1, 2, 3, 4]
    assert frame.evaluated_slices(fg, frame.NATIVE_RULES).tolist() == [2, 3]


def test_model_frame_equals_direct_computation_and_differs_from_native():
    image, lesion = _case()
    image[:, :, 0] = image.min()  # a slice without brain: scored (map 0) in the reference frame
    fr = _restored(image, lesion)
    idx = np.arange(SHAPE[2])
    framed = frame.frame_slices(fr, lesion, frame.REFERENCE_RULES, idx)
    entry = EvalEntry("a", fr.native_map("input"), lesion, fr.foreground, framed=framed)
    model = evaluate_maps([entry], rules=frame.REFERENCE_RULES)

    # direct: the 32-px arrays, the lesion resized there (skimage) then > 0.4, map zeroed at input <= 0
    lesion_32 = np.stack(
        [
            resize(lesion[:, :, k].astype(float), (SIZE, SIZE), order=1, mode="edge", anti_aliasing=True)
            > 0.4
            for k in idx
        ]
    )
    maps_32 = np.where(fr.images > 0, fr.maps, 0.0)
    assert model["n_slices"] == SHAPE[2] and model["frame"]["size"] == SIZE
    assert model["ap_pixel"] == pytest.approx(average_precision_score(lesion_32.ravel(), maps_32.ravel()))
    slice_lab = lesion_32.any(axis=(1, 2))
    assert 0 < slice_lab.sum() < slice_lab.size
    scores = maps_32.reshape(SHAPE[2], -1).mean(axis=1)
    assert model["auroc"] == pytest.approx(roc_auc_score(slice_lab, scores))

    native = evaluate_maps(
        [EvalEntry("a", fr.native_map("mask"), lesion, fr.foreground)], size=SIZE, square="crop"
    )
    assert native["n_slices"] < model["n_slices"]  # the slice without brain is dropped
    assert abs(native["ap_pixel"] - model["ap_pixel"]) > 1e-3


def test_halo_pixels_are_counted_in_the_reference_frame():
    image, lesion = _case()
    fr = _prepared(image)
    halo = (fr.images > 0) & ~fr.masks
    assert halo.sum() > 0  # linear resizing spreads the input one pixel past the resized mask
    fr.maps = np.full(fr.images.shape, 0.5, np.float32)
    idx = np.arange(SHAPE[2])
    with_halo = frame.frame_slices(fr, lesion, frame.REFERENCE_RULES, idx)
    no_halo = frame.frame_slices(fr, lesion, frame.FrameRules(foreground="mask"), idx)
    assert np.all(with_halo.maps[halo] == 0.5) and np.all(no_halo.maps[halo] == 0)
    assert np.count_nonzero(with_halo.maps) == np.count_nonzero(fr.images > 0)
    assert np.count_nonzero(no_halo.maps) == np.count_nonzero(fr.masks)


def test_crop_matches_numpy_centre_crop():
    shape = (40, 56, 6)
    image, lesion = _case(shape)
    fr = _prepared(image, "crop", size=40)  # the shorter side: no resizing
    assert fr.geometry.square == "crop"
    fg = foreground_mask(image)
    lo, hi = min(image[fg].min(), 0.0), image[fg].max()
    normalised = np.where(fg, (image - lo) / (hi - lo), 0.0)
    normalised[normalised < 1e-4] = 0.0
    expected = np.moveaxis(normalised[:, 8:48, :], -1, 0)  # (56 - 40) / 2 = 8 columns off each side
    np.testing.assert_allclose(fr.images, expected, atol=1e-6)
    framed = frame.frame_slices(fr, lesion, frame.REFERENCE_RULES, np.arange(shape[2]))
    np.testing.assert_array_equal(framed.lesion, np.moveaxis(lesion[:, 8:48, :], -1, 0))
    with pytest.raises(ValueError, match="square"):
        frame.frame_slices(fr, lesion, frame.FrameRules(square="pad"), [0])


def _framed(seed: int) -> frame.FramedSlices:
    rng = np.random.default_rng(seed)
    images = gaussian_filter(rng.random((3, 24, 24)), (0, 2, 2)).astype(np.float32)
    rest = np.clip(images + 0.05 * rng.standard_normal(images.shape), 0, 1).astype(np.float32)
    fg = np.zeros(images.shape, bool)
    fg[:, 3:21, 4:20] = True
    lesion = np.zeros(images.shape, bool)
    lesion[1:, 8:13, 8:12] = True
    maps = np.where(fg, rng.random(images.shape) * (1 + 2 * lesion), 0).astype(np.float32)
    return frame.FramedSlices(np.arange(3), None, maps, lesion, fg, images, rest)


def test_fidelity_equals_direct_computation():
    framed = _framed(0)
    got = Fidelity().add(framed).result()
    healthy = framed.foreground & ~framed.lesion
    ssim = []
    for j in range(3):
        _, full = structural_similarity(
            framed.restorations[j].astype(float), framed.images[j].astype(float), data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True,
        )  # fmt: skip
        ssim.append(full[healthy[j]])
    assert got["ssim_healthy"] == pytest.approx(np.concatenate(ssim).mean())
    mse = np.mean((framed.restorations[healthy].astype(float) - framed.images[healthy]) ** 2)
    assert got["psnr_healthy"] == pytest.approx(10 * np.log10(1 / mse))
    bias = np.mean(framed.restorations[healthy].astype(float) - framed.images[healthy])
    assert got["bias_healthy"] == pytest.approx(bias) and abs(bias) > 1e-4
    assert got["map_mean_healthy"] == pytest.approx(framed.maps[healthy].mean())
    assert got["map_mean_lesion"] == pytest.approx(framed.maps[framed.lesion].mean())
    assert got["map_ratio"] == pytest.approx(got["map_mean_lesion"] / got["map_mean_healthy"])
    assert got["map_ratio"] > 1
    # pooled over cases: pixel-weighted, not a mean of the cases
    other = _framed(1)
    other.lesion[:] = False
    pooled = Fidelity().add(framed).merge(Fidelity().add(other)).result()
    both = np.concatenate([framed.maps[healthy], other.maps[other.foreground]])
    assert pooled["map_mean_healthy"] == pytest.approx(both.mean())
    # no restoration (a map read from disk): map means only
    framed.restorations = None
    assert Fidelity().add(framed).result()["ssim_healthy"] is None


def test_fidelity_is_measured_in_the_reference_scale_whatever_the_normalisation():
    """Members with another normalisation are scored against the max-normalised input: a
    restoration equal to their own input maps onto it wherever their clip did not bite."""
    from pseudohealthy.engine.restore import prepare_for

    image, _ = _case()
    volume, full = volume_from_array(image), SHAPE[0]  # no resizing: pixelwise comparisons
    ensemble = SimpleNamespace(image_size=full, members=[])
    ref = frame.restore_frames(volume, ensemble, RestoreSettings(square="crop"), slices=[])
    assert frame.FIDELITY_NORM == "max" and ref.fidelity_images is None  # the model's own scale
    settings = RestoreSettings(square="crop", norm="percentile")
    pct = frame.restore_frames(volume, ensemble, settings, slices=[])
    np.testing.assert_allclose(pct.fidelity_images, ref.images, atol=1e-6)
    _, rest = frame.fidelity_scale(prepare_for(volume, ensemble, settings), pct.images)
    inside = (pct.images > 0.01) & (pct.images < 0.99)
    assert inside.mean() > 0.2
    assert np.abs(pct.images[inside] - ref.images[inside]).mean() > 0.05  # the two scales differ
    np.testing.assert_allclose(rest[inside], ref.images[inside], atol=1e-5)
    framed = frame.frame_slices(pct, np.zeros(SHAPE, bool), frame.FrameRules(square="crop"), range(SHAPE[2]))
    np.testing.assert_allclose(framed.images, ref.images, atol=1e-6)  # what Fidelity compares
    np.testing.assert_array_equal(framed.restorations, pct.fidelity_restorations)


def test_cli_model_frame(tmp_path, monkeypatch, capsys):
    image, lesion = _case()
    scan = write_nifti(tmp_path / "p" / "FLAIR.nii.gz", image)
    mask = write_nifti(tmp_path / "p" / "lesion_mask.nii.gz", lesion.astype(np.uint8))
    calls = []

    def fake(volume, ensemble, settings, slices, brain_mask):
        calls.append((settings.square, list(slices)))
        return _restored(volume.data, lesion, settings.square)

    monkeypatch.setattr("pseudohealthy.evaluation.cases.restore_model_frame", fake)
    monkeypatch.setattr("pseudohealthy.model.checkpoint.Ensemble.from_dir", lambda path: "ENSEMBLE")
    (tmp_path / "ens").mkdir()
    out = tmp_path / "out"
    argv = ["-q", "evaluate", "--scans", str(scan), "--masks", str(mask), "--ensemble", str(tmp_path / "ens")]
    assert main([*argv, "-o", str(out)]) == 0
    assert calls == [("crop", list(range(SHAPE[2])))]  # every axial slice, squares cropped
    result = json.loads((out / "metrics.json").read_text())
    assert result["frame"]["frame"] == "model" and result["frame"]["foreground"] == "input"
    assert result["n_slices"] == SHAPE[2]
    fid = result["fidelity"]
    assert fid["ssim_healthy"] is not None and fid["map_ratio"] == pytest.approx(
        fid["map_mean_lesion"] / fid["map_mean_healthy"]
    )
    assert result["volumes"][0]["fidelity"] == fid  # one case: per case == pooled
    printed = capsys.readouterr().out
    assert "fidelity" in printed and "PSNR" in printed
    assert (out / "anomaly_maps" / "FLAIR_anomaly.nii.gz").is_file()
    # maps on disk are in the scan's grid: the model frame refuses them; --square pad overrides
    again = [*argv, "--restorations", str(out / "anomaly_maps"), "-o", str(tmp_path / "again")]
    assert main([*again, "--frame", "model"]) == 2
    assert "--frame native" in capsys.readouterr().err
    assert main([*argv, "--square", "pad", "-o", str(tmp_path / "pad")]) == 0
    assert calls[-1][0] == "pad"
    assert main([*argv, "--size", "64", "-o", str(tmp_path / "size")]) == 2
