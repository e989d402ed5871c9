"""Evaluation in the benchmark frame: evaluate_maps on arrays and the `pseudohealthy evaluate` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

import pseudohealthy.evaluation.pooling as pooling
from conftest import phantom, write_nifti
from pseudohealthy.cli import main
from pseudohealthy.data.io import load_mask, load_scan, save_like
from pseudohealthy.data.preprocess import SliceGeometry, foreground_mask
from pseudohealthy.engine.settings import RestoreSettings
from pseudohealthy.evaluation.metrics import MetricsError

KEYS = {"ap_image", "auroc", "ap_pixel", "best_dice", "dice_at_5fpr", "n_slices", "n_volumes"}
PNG = b"\x89PNG\r\n\x1a\n"


def _case(seed: int, shape=(40, 40, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A phantom brain with a bright spherical lesion in some slices: (image, lesion)."""
    image = phantom(shape, seed=seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    centre = (shape[0] * 0.4 + seed, shape[1] * 0.55, shape[2] * 0.5)
    lesion = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, (6, 6, 2.5), strict=True)) < 1
    image[lesion] += 0.3
    return image, lesion


def _blurred(lesion: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """A near-perfect predictor: the lesion blurred, zero outside the brain."""
    return np.clip(gaussian_filter(lesion.astype(np.float32), 1.0) * 0.9, 0, 1) * fg


def _entry(seed: int, anomaly=None) -> pooling.EvalEntry:
    image, lesion = _case(seed)
    fg = foreground_mask(image)
    return pooling.EvalEntry(
        f"case{seed}", _blurred(lesion, fg) if anomaly is None else anomaly, lesion, fg, image
    )


def test_evaluate_maps_on_arrays():
    entries = [_entry(0), _entry(1)]
    result = pooling.evaluate_maps(iter(entries), size=32)
    assert KEYS <= set(result)
    n_slices = sum(pooling.foreground_slices(e.foreground).size for e in entries)
    assert result["n_volumes"] == 2 and result["n_slices"] == n_slices
    assert result["n_pixels"] == n_slices * 32 * 32  # the whole frame, background included
    assert result["ap_pixel"] > 0.9 and result["best_dice"] > 0.8
    assert result["auroc"] > 0.9
    base = result[pooling.BASELINE_KEY]
    assert KEYS <= set(base) and base["n_slices"] == n_slices
    assert base["ap_pixel"] < result["ap_pixel"]
    assert [v["name"] for v in result["volumes"]] == ["case0", "case1"]
    assert result["volumes"][0]["n_lesion_slices"] > 0
    json.loads(pooling.to_json(result))  # JSON-ready
    assert len(result["curves"]["method"]["pr_pixel"]["recall"]) <= pooling.CURVE_POINTS + 2
    table = pooling.format_table(result, "blurred mask")
    assert "blurred mask" in table and "intensity baseline" in table and "Dice@5%FPR" in table


def test_evaluate_maps_random_map_is_near_prevalence():
    rng = np.random.default_rng(0)
    entries = []
    for seed in (0, 1):
        e = _entry(seed)
        e.anomaly = rng.random(e.lesion.shape).astype(np.float32) * e.foreground
        e.image = None  # no baseline
        entries.append(e)
    result = pooling.evaluate_maps(entries, size=32)
    assert pooling.BASELINE_KEY not in result
    assert result["ap_pixel"] < 4 * result["prevalence_pixel"]


def test_evaluate_maps_slices_and_frame():
    e = _entry(0)
    e.indices = np.array([4, 5])  # both through the lesion (centre z = 5, radius 2.5)
    result = pooling.evaluate_maps([e], size=24)
    assert result["n_slices"] == 2 and result["n_pixels"] == 2 * 24 * 24
    assert result["n_lesion_slices"] == 2
    # one class only: slice-level metrics undefined, pixel metrics still computed
    assert result["auroc"] is None and result["ap_pixel"] > 0.9
    # masks are resized into the frame, then thresholded at > 0.4
    framed = pooling.to_frame(e.lesion, e.indices, SliceGeometry((40, 40), 24))
    assert result["n_lesion_pixels"] == int((framed > 0.4).sum()) > 0


def test_evaluate_maps_without_lesion_raises():
    e = _entry(0)
    e.lesion = np.zeros_like(e.lesion)
    with pytest.raises(MetricsError, match="no lesion pixel"):
        pooling.evaluate_maps([e], size=32)


# --- the command line -------------------------------------------------------------------------


def _write_anomaly(scan: Path, mask: Path, path: Path) -> Path:
    volume = load_scan(scan)
    lesion = load_mask(mask, volume)
    return save_like(_blurred(lesion, foreground_mask(volume.data)), volume, path)


def _forbid_restore(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("restore must not be called when maps exist")

    monkeypatch.setattr("pseudohealthy.evaluation.cases.restore_anomaly", boom)
    monkeypatch.setattr("pseudohealthy.model.checkpoint.Ensemble.from_dir", boom)


def _check_outputs(out: Path) -> dict:
    result = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(result) and KEYS <= set(result[pooling.BASELINE_KEY])
    for name in ("pr_curve.png", "roc_curve.png"):
        assert (out / name).read_bytes()[:8] == PNG
    return result


def test_cli_reuses_restorations_on_real_scans(shared_data, tmp_path, monkeypatch, capsys):
    brats = shared_data / "lesion" / "brats2013" / "brats_2013_pat0003_1"
    mslub = shared_data / "lesion" / "mslub" / "patient07"
    scans = [brats / "Flair_subtrMeanDivStd.nii.gz", mslub / "FLAIR.nii.gz"]
    masks = [brats / "OTMultiClass.nii.gz", mslub / "lesion_mask.nii.gz"]
    rest = tmp_path / "restorations"
    _write_anomaly(scans[0], masks[0], rest / "Flair_subtrMeanDivStd_anomaly.nii.gz")
    _write_anomaly(scans[1], masks[1], rest / "FLAIR_anomaly.nii.gz")
    _forbid_restore(monkeypatch)
    out = tmp_path / "out"
    argv = ["-q", "evaluate", "--scans", *map(str, scans), "--masks", *map(str, masks)]
    argv += ["--restorations", str(rest), "--ensemble", str(tmp_path / "unused"), "-o", str(out)]
    argv += ["--slices-per-volume", "16"]
    assert main(argv) == 0
    result = _check_outputs(out)
    assert result["n_volumes"] == 2 and result["n_slices"] == 32
    assert result["settings"]["restored"] == [] and result["settings"]["engine"] is None
    assert result["ap_pixel"] > 0.9 > result[pooling.BASELINE_KEY]["ap_pixel"]
    assert {Path(v["anomaly_source"]).parent for v in result["volumes"]} == {rest}
    printed = capsys.readouterr().out
    assert "intensity baseline" in printed and "AP_p" in printed
    # outputs are not overwritten without --overwrite
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err


def _small_set(root: Path, names=("a", "b")) -> list[tuple[Path, Path]]:
    pairs = []
    for seed, name in enumerate(names):
        image, lesion = _case(seed)
        scan = write_nifti(root / name / "FLAIR.nii.gz", image)
        mask = write_nifti(root / name / "lesion_mask.nii.gz", lesion.astype(np.uint8))
        pairs.append((scan, mask))
    return pairs


def test_cli_pairs_csv_restores_once_then_reuses(tmp_path, monkeypatch):
    pairs = _small_set(tmp_path / "data", names=("p1", "p2"))
    csv = tmp_path / "data" / "pairs.csv"
    rows = [f"{s.relative_to(csv.parent)},{m.relative_to(csv.parent)}" for s, m in pairs]
    csv.write_text("scan,mask\n" + "\n".join(rows) + "\n")
    (tmp_path / "ens").mkdir()
    calls = []

    def fake_restore(volume, ensemble, settings, slices, brain_mask):
        calls.append((volume.name, ensemble, settings, list(slices)))
        lesion = load_mask(volume.path.parent / "lesion_mask.nii.gz", volume)
        return _blurred(lesion, foreground_mask(volume.data))

    monkeypatch.setattr("pseudohealthy.evaluation.cases.restore_anomaly", fake_restore)
    monkeypatch.setattr("pseudohealthy.model.checkpoint.Ensemble.from_dir", lambda path: "ENSEMBLE")
    settings = "pseudohealthy.cli.evaluate._settings"
    monkeypatch.setattr(settings, lambda args: RestoreSettings(steps=args.steps))
    out = tmp_path / "out"
    argv = ["-q", "evaluate", "--pairs", str(csv), "--ensemble", str(tmp_path / "ens"), "--size", "32"]
    argv += ["--frame", "native"]  # restore_anomaly: the scan-grid path
    assert main([*argv, "--steps", "3", "-o", str(out)]) == 0
    assert [(c[0], c[1], c[2]) for c in calls] == [("FLAIR", "ENSEMBLE", RestoreSettings(steps=3))] * 2
    first = _check_outputs(out)
    assert first["settings"]["restored"] == ["p1_FLAIR", "p2_FLAIR"]
    assert first["settings"]["engine"]["steps"] == 3
    saved = sorted(p.name for p in (out / "anomaly_maps").iterdir())
    assert saved == ["p1_FLAIR_anomaly.nii.gz", "p2_FLAIR_anomaly.nii.gz"]

    _forbid_restore(monkeypatch)
    again = tmp_path / "again"
    assert main([*argv, "--restorations", str(out / "anomaly_maps"), "-o", str(again)]) == 0
    second = _check_outputs(again)
    for key in KEYS:
        assert second[key] == pytest.approx(first[key], abs=1e-6)


def test_cli_dataset_dir_with_repeated_scan_names(tmp_path, monkeypatch):
    pairs = _small_set(tmp_path / "data")
    rest = tmp_path / "rest"
    _write_anomaly(*pairs[0], rest / "a_FLAIR_anomaly.nii.gz")  # unique name
    _write_anomaly(*pairs[1], rest / "b" / "FLAIR_anomaly.nii.gz")  # per-folder layout
    _write_anomaly(*pairs[1], rest / "FLAIR_anomaly.nii.gz")  # ambiguous: must not be used for a
    _forbid_restore(monkeypatch)
    out = tmp_path / "out"
    argv = ["-q", "evaluate", "--dataset-dir", str(tmp_path / "data"), "--scan-glob", "*/FLAIR.nii.gz"]
    argv += ["--mask-name", "lesion_mask.nii.gz", "--restorations", str(rest), "--size", "32", "-o", str(out)]
    assert main(argv) == 0
    result = _check_outputs(out)
    sources = {v["name"]: Path(v["anomaly_source"]) for v in result["volumes"]}
    assert sources == {
        "a_FLAIR": rest / "a_FLAIR_anomaly.nii.gz",
        "b_FLAIR": rest / "b" / "FLAIR_anomaly.nii.gz",
    }


def test_cli_errors(tmp_path, capsys):
    ((scan, mask),) = _small_set(tmp_path / "data", names=("x",))
    out = str(tmp_path / "out")
    cases = [
        (["--scans", str(scan), "--masks", str(mask), "--restorations", str(tmp_path)], "give --ensemble"),
        (["--scans", str(scan), "--masks", str(mask), "--ensemble", str(tmp_path / "nope")], "not found"),
        (["--scans", str(scan), "--masks", str(mask), str(mask), "--restorations", str(tmp_path)], "2 masks"),
        (["--restorations", str(tmp_path)], "give the test set"),
        (["--scans", str(scan), "--masks", str(mask)], "--restorations"),
    ]
    for args, message in cases:
        assert main(["-q", "evaluate", *args, "-o", out]) == 2, args
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_thin_curve_keeps_ends_and_shape():
    from pseudohealthy.figures.plots import thin_curve

    x = np.linspace(0, 1, 100_000)
    y = 1 - x**3
    tx, ty = thin_curve(x, y, 200)
    assert 50 < tx.size <= 202
    assert (tx[0], ty[0], tx[-1], ty[-1]) == (x[0], y[0], x[-1], y[-1])
    assert np.all(np.diff(tx) > 0)
    np.testing.assert_allclose(np.interp(x, tx, ty), y, atol=1e-3)
    assert thin_curve(x[:10], y[:10], 200)[0].size == 10
