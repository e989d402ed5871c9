"""The real-data protocols under ``benchmarks/`` run end to end in their ``--tiny`` smoke mode."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from benchmark_modules import load_benchmark
from conftest import SHARED_DATA
from recompute import (
    MASK_THRESHOLD,
    assert_close,
    canonical,
    intensity_scores,
    mask,
    padded_frame,
    pixel_metrics,
    slice_metrics,
)

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REFERENCE = SHARED_DATA.parent / "REFERENCE.md"  # the reference facts, beside the shared data
REFERENCE_COLUMNS = ("ap_image", "auroc", "ap_pixel", "best_dice")  # its Table 1: AP_i, AUROC, AP_p, [Dsc]
METRICS = ("ap_image", "auroc", "ap_pixel", "best_dice", "dice_at_5fpr", "n_slices")


def _load(name: str) -> ModuleType:
    return load_benchmark(name)


def _run(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCHMARKS / script), "--tiny", "--out", str(out), *extra]
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def _check_metrics(metrics: dict, n_slices: int) -> None:
    assert set(METRICS) <= set(metrics), metrics
    assert metrics["n_slices"] == n_slices
    for key in ("ap_pixel", "best_dice"):
        assert 0.0 < metrics[key] <= 1.0 and math.isfinite(metrics[key]), (key, metrics[key])
    assert 0.0 <= metrics["dice_at_5fpr"] <= 1.0


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def brats_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, str]:
    assert (shared_data / "lesion" / "brats2013").is_dir(), "BraTS 2013 scans absent from ../shared/data"
    out = tmp_path_factory.mktemp("protocol_brats")
    return out, _run("protocol_brats.py", out).stdout


def _check_arms(out: Path, stdout: str, *, tests: list[str], n_per_test: int) -> dict:
    """What every three-arm protocol writes: the commands, per-arm metrics and maps, table, figure."""
    for step in ("train", "restore", "evaluate"):
        assert f"$ pseudohealthy {step} " in stdout  # the exact commands are printed
    results = json.loads((out / "results.json").read_text())
    assert results["split"]["test"] == tests
    assert set(results["arms"]) == {"ensemble", "single", "baseline"}
    assert {k: len(v) for k, v in results["slices"].items()} == {t: n_per_test for t in tests}
    n = n_per_test * len(tests)
    for arm, info in results["arms"].items():
        _check_metrics(info["metrics"], n)
        for test in tests:
            assert list(Path(info["restore_dir"], test).glob("*_anomaly.nii.gz")), (arm, test)
        assert json.loads(Path(info["eval_dir"], "metrics.json").read_text())["n_slices"] == n
    arms = results["arms"]
    assert arms["ensemble"]["members"] == ["fold_2", "fold_6"]
    assert arms["single"]["members"] == ["fold_2"]
    assert arms["baseline"]["members"] == ["fold_2"]
    assert [m["preset"] for m in arms["ensemble"]["training"]] == ["tiny", "tiny"]
    assert [m["name"] for m in arms["single"]["training"]] == ["fold_2"]
    assert arms["baseline"]["training"][0]["preset"] == "tiny-baseline"
    for info in arms.values():
        assert all(m["steps"] == 4 and m["n_train_slices"] > 0 for m in info["training"])
    _check_metrics(results["intensity_baseline"], n)
    cmds = [c["command"] for c in results["commands"]]
    assert all(c["rc"] == 0 for c in results["commands"])
    assert sum(c.startswith("pseudohealthy train") for c in cmds) == 2
    assert any("--preset tiny-baseline" in c for c in cmds)
    assert sum("--members fold_2" in c for c in cmds) == len(tests)  # the single arm, per test scan
    assert sum(c.startswith("pseudohealthy restore") for c in cmds) == 3 * len(tests)
    assert sum(c.startswith("pseudohealthy evaluate") for c in cmds) == 3
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    labels = [r.split("|")[1].strip() for r in rows[1:]]
    assert labels[0].startswith("conditioned ensemble (2: fold_2, fold_6)")
    assert labels[1].startswith("single conditioned model (fold_2)")
    assert labels[2].startswith("unconditional baseline")
    assert labels[3].startswith("intensity baseline")
    assert sum("paper Table 1" in lab and "different data" in lab for lab in labels) == 2
    assert all(len(r.split("|")) == 9 for r in rows[:7])  # arm + 6 metrics
    assert "Where the arms differ inside lesions" in table and len(rows) == 7 + 4  # + the contrast table
    for info in arms.values():
        contrast = info["lesion_contrast"]
        assert contrast["map_in_lesion"] >= 0 and contrast["map_in_other_brain"] > 0
        ratio = contrast["map_in_lesion"] / contrast["map_in_other_brain"]
        assert math.isclose(contrast["map_ratio"], ratio)
        assert math.isfinite(contrast["change_in_lesion"]) and contrast["abs_change_in_other_brain"] > 0
    assert _is_png(out / "figure.png")
    return results


def _published() -> dict[str, dict[str, float]]:
    """Table 1 of the paper as REFERENCE.md gives it: dataset (first word) -> metrics."""
    assert REFERENCE.is_file(), f"{REFERENCE} absent (it lies beside the shared data)"
    text = REFERENCE.read_text().split("## Published results", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {
        cells[0].split()[0]: dict(zip(REFERENCE_COLUMNS, map(float, cells[1:5]), strict=True))
        for cells in rows[1:]
    }


def _check_paper_rows(out: Path, results: dict, datasets: tuple[str, ...]) -> None:
    """The paper rows of the table are REFERENCE.md's Table 1, not numbers typed into the test."""
    published, table = _published(), (out / "table.md").read_text().splitlines()
    assert len(results["paper_table1"]) == len(datasets)
    for (label, metrics), dataset in zip(results["paper_table1"].items(), datasets, strict=True):
        assert dataset in label and metrics == published[dataset], (label, metrics)
        (row,) = [line for line in table if line.startswith(f"| {label} |")]
        assert [c.strip() for c in row.split("|")[2:6]] == [f"{metrics[k]:.3f}" for k in REFERENCE_COLUMNS]


def _check_recomputed(results: dict, files: dict[str, tuple[Path, Path, Path]], *, invert: bool) -> None:
    """Each arm's reported metrics equal scikit-learn's on the maps it saved, and the intensity
    baseline's on the scans' clipped intensity (tolerance 1e-9): pooled over the reported slices
    of every test scan, read with nibabel, padded to a square and resized to the evaluation size
    (``files``: test label -> scan, lesion mask, brain mask)."""
    size = results["settings"]["size"]
    labels, base, maps = [], [], {arm: [] for arm in results["arms"]}
    for test, slices in results["slices"].items():
        scan, lesion, brain = files[test]
        labels.append(padded_frame(mask(lesion), slices, size) > MASK_THRESHOLD)
        scores = intensity_scores(canonical(scan), mask(brain), invert=invert)
        base.append(np.clip(padded_frame(scores, slices, size), 0.0, 1.0))
        for arm, info in results["arms"].items():
            (path,) = Path(info["restore_dir"], test).glob("*_anomaly.nii.gz")
            maps[arm].append(np.clip(padded_frame(canonical(path), slices, size), 0.0, 1.0))
    truth = np.concatenate(labels)
    assert truth.any() and not truth.all()
    for name, found in [*maps.items(), ("intensity_baseline", base)]:
        reported = results[name] if name == "intensity_baseline" else results["arms"][name]["metrics"]
        pooled = np.concatenate(found)
        assert_close(reported, pixel_metrics(pooled, truth) | slice_metrics(pooled, truth), 1e-9, name)


CONTRAST_KEYS = ("map_in_lesion", "map_in_other_brain", "change_in_lesion", "abs_change_in_other_brain")


def _check_contrast(results: dict, files: dict[str, tuple[Path, Path, Path]]) -> None:
    """Each arm's lesion contrast equals numpy's on the maps and restorations it saved, in the scans'
    grid over the reported slices (relative tolerance 1e-5: the script sums float32 voxels)."""
    for arm, info in results["arms"].items():
        found: dict[str, list[np.ndarray]] = {key: [] for key in CONTRAST_KEYS}
        for test, slices in results["slices"].items():
            scan, lesion, brain = files[test]
            image, les, inside = canonical(scan), mask(lesion), mask(brain)
            (path,) = Path(info["restore_dir"], test).glob("*_anomaly.nii.gz")
            amap = canonical(path)
            change = canonical(str(path).replace("_anomaly.", "_pseudohealthy.")) - image
            change /= np.percentile(image[inside], 99)
            restored = np.zeros_like(inside)
            restored[:, :, slices] = True
            in_lesion, other = les & inside & restored, ~les & inside & restored
            for key, values in zip(
                CONTRAST_KEYS,
                (amap[in_lesion], amap[other], change[in_lesion], np.abs(change[other])),
                strict=True,
            ):
                found[key].append(values)
        for key, values in found.items():
            expected = float(np.concatenate(values).mean())
            assert math.isclose(info["lesion_contrast"][key], expected, rel_tol=1e-5), (arm, key, expected)


@pytest.mark.slow
def test_protocol_brats_tiny_runs_every_arm(brats_run: tuple[Path, str]) -> None:
    out, stdout = brats_run
    results = _check_arms(out, stdout, tests=["brats_2013_pat0006_1"], n_per_test=3)
    assert len(results["split"]["train"]) == 3 and "brats_2013_pat0006_1" not in results["split"]["train"]
    _check_paper_rows(out, results, ("BraTS-T2", "BraTS-T1"))
    for info in results["arms"].values():
        assert Path(
            info["restore_dir"], "brats_2013_pat0006_1", "Flair_subtrMeanDivStd_anomaly.nii.gz"
        ).is_file()


@pytest.mark.slow
def test_protocol_brats_metrics_recompute(brats_run: tuple[Path, str], shared_data: Path) -> None:
    out, _ = brats_run
    folder = shared_data / "lesion" / "brats2013" / "brats_2013_pat0006_1"
    names = ("Flair_subtrMeanDivStd", "OTMultiClass", "brainmask")  # scan, lesion, brain
    files = {folder.name: tuple(folder / f"{name}.nii.gz" for name in names)}
    results = json.loads((out / "results.json").read_text())
    _check_recomputed(results, files, invert=False)
    _check_contrast(results, files)


def test_protocol_brats_reuses_given_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A given run with trained members is reused as it is; an empty one is trained into."""
    protocol, arms = _load("protocol_brats"), _load("_arms")
    calls: list[list[str]] = []
    monkeypatch.setattr(arms, "run", lambda cmd, log, capture=False: calls.append(cmd) or "")
    args = argparse.Namespace(device="cpu", seed=0, steps=None, tiny=False)
    data = protocol.training_data(tmp_path)
    given = tmp_path / "given"
    for fold in ("fold_9", "fold_2"):
        (given / fold).mkdir(parents=True)
        (given / fold / "pseudohealthy.json").write_text("{}")
    (given / "log.csv").write_text("")
    assert arms.members(given) == ["fold_2", "fold_9"]
    assert arms.train(args, given, "cpu", "2,6,9", data, [], given=True) == given
    assert calls == []
    arms.train(args, tmp_path / "empty", "cpu-baseline", "2", data, [], given=True)
    assert len(calls) == 1 and calls[0][0] == "train"
    cmd = calls[0]
    assert cmd[cmd.index("--preset") + 1] == "cpu-baseline" and cmd[cmd.index("--folds") + 1] == "2"
    assert "--resume" in cmd and cmd[cmd.index("--lesion-masks-pattern") + 1] == "OTMultiClass.nii.gz"
    assert "brats_2013_pat0006_1" not in " ".join(cmd)  # the test patient never trains
    assert [m["name"] for m in arms.describe(given, [protocol.TEST_PATIENT])] == ["fold_2", "fold_9"]
    leaky = tmp_path / "leaky" / "fold_0"
    leaky.mkdir(parents=True)
    info = {"data": {"files": ["/x/brats_2013_pat0006_1/Flair_subtrMeanDivStd.nii.gz"]}}
    (leaky / "pseudohealthy.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit, match="test patient"):
        arms.describe(leaky.parent, [protocol.TEST_PATIENT])


def test_protocol_table_has_every_column() -> None:
    protocol = _load("_arms")
    text = protocol.table({"a": {"ap_image": 0.5, "auroc": None, "n_slices": 7}})
    header, _, row = text.splitlines()
    assert header.split("|")[2:-1] == [f" {c} " for c, _ in protocol.COLUMNS]
    assert row == "| a | 0.500 | – | – | – | – | 7 |"


def test_protocol_table_keeps_small_map_values() -> None:
    protocol = _load("_arms")
    text = protocol.table({"a": {"map_in_lesion": 2.5e-05, "map_ratio": 0.0}}, protocol.CONTRAST_COLUMNS)
    assert text.splitlines()[-1] == "| a | 2.50e-05 | – | 0.000 | – | – |"


@pytest.fixture(scope="module")
def mslub_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, str]:
    import SimpleITK  # noqa: F401  (the 'preprocess' extra, installed by setup.sh; fail loudly if missing)

    assert (shared_data / "lesion" / "mslub").is_dir(), "MSLUB scans absent from ../shared/data"
    assert (shared_data / "healthy" / "ixi_t1").is_dir(), "IXI T1 scans absent from ../shared/data"
    out = tmp_path_factory.mktemp("protocol_mslub")
    return out, _run("protocol_mslub.py", out).stdout


@pytest.mark.slow
def test_protocol_mslub_tiny_runs_every_arm(mslub_run: tuple[Path, str]) -> None:
    tmp_path, stdout = mslub_run
    assert "$ pseudohealthy preprocess " in stdout
    results = _check_arms(tmp_path, stdout, tests=["patient07", "patient19"], n_per_test=3)
    assert results["intensity_baseline"]["invert"] is True  # T1: lesions are dark
    for arm in results["arms"].values():
        assert json.loads(Path(arm["eval_dir"], "metrics.json").read_text())["n_volumes"] == 2
    cmds = [c["command"].split()[1] for c in results["commands"]]
    # IXI into MNI, two trainings, each MSLUB patient into the same frame (lesion mask carried), arms
    assert cmds[:5] == ["preprocess", "train", "train", "preprocess", "preprocess"]
    assert (tmp_path / "mslub_mni/patient07/T1_mask.nii.gz").is_file()
    train_files = [f for m in results["arms"]["ensemble"]["training"] for f in m["train_files"]]
    assert train_files and all("ixi_mni" in f and "IXI" in f for f in train_files)  # healthy IXI only
    _check_paper_rows(tmp_path, results, ("BraTS-T1", "ATLAS"))


@pytest.mark.slow
def test_protocol_mslub_metrics_recompute(mslub_run: tuple[Path, str]) -> None:
    out, _ = mslub_run
    results = json.loads((out / "results.json").read_text())
    files = {
        p: tuple(out / "mslub_mni" / p / f"T1_{f}.nii.gz" for f in ("preprocessed", "mask", "brainmask"))
        for p in ("patient07", "patient19")
    }
    _check_recomputed(results, files, invert=True)  # T1: the baseline scores dark voxels
    _check_contrast(results, files)


def test_protocol_mslub_reuses_preprocessed_scans(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    protocol = _load("protocol_mslub")
    calls: list[list[str]] = []
    monkeypatch.setattr(protocol, "run", lambda cmd, log, capture=False: calls.append(cmd) or "")
    raw, out = tmp_path / "raw", tmp_path / "ixi_mni"
    raw.mkdir()
    out.mkdir()
    for name in ("IXI001_T1", "IXI002_T1", "IXI003_T1"):
        (raw / f"{name}.nii.gz").write_bytes(b"")
    (out / "IXI002_T1_preprocessed.nii.gz").write_bytes(b"")
    args = argparse.Namespace(ixi_dir=raw, n_ixi=None, refine=True)
    assert protocol.preprocess_ixi(args, out, []) == out
    assert len(calls) == 1 and calls[0][0] == "preprocess" and "--refine" in calls[0]
    assert [Path(a).name for a in calls[0] if a.endswith(".nii.gz")] == [
        "IXI001_T1.nii.gz",
        "IXI003_T1.nii.gz",
    ]
    calls.clear()
    (out / "IXI001_T1_preprocessed.nii.gz").write_bytes(b"")
    (out / "IXI003_T1_preprocessed.nii.gz").write_bytes(b"")
    protocol.preprocess_ixi(args, out, [])
    assert calls == []  # all done: nothing is registered again


def test_lesion_contrast_measures_what_a_restoration_changed(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    arms = _load("_arms")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    brain = np.zeros((10, 10, 4), np.uint8)
    brain[2:8, 2:8, :] = 1
    lesion = np.zeros_like(brain)
    lesion[4:6, 4:6, :] = 1
    image = np.where(brain > 0, 100.0, 0.0).astype(np.float32)
    image[lesion > 0] = 50.0  # dark lesion
    restored = np.where(brain > 0, 100.0, 0.0).astype(np.float32)  # the lesion healed, nothing else
    amap = np.where(lesion > 0, 0.8, np.where(brain > 0, 0.2, 0.0)).astype(np.float32)
    amap[:, :, 3] = 0.0  # slice 3 was not restored: it does not count
    restored[:, :, 3] = image[:, :, 3] - 7.0
    scan_dir = tmp_path / "patient01"
    scan_dir.mkdir()
    out = tmp_path / "restore" / "patient01"
    out.mkdir(parents=True)
    for path, data in (
        (scan_dir / "T1.nii.gz", image),
        (scan_dir / "lesion.nii.gz", lesion),
        (scan_dir / "brain.nii.gz", brain),
        (out / "T1_anomaly.nii.gz", amap),
        (out / "T1_pseudohealthy.nii.gz", restored),
    ):
        nib.save(nib.Nifti1Image(data, affine), path)
    test = arms.TestScan(scan_dir / "T1.nii.gz", scan_dir / "lesion.nii.gz", scan_dir / "brain.nii.gz")
    contrast = arms.lesion_contrast([test], tmp_path / "restore")
    assert math.isclose(contrast["map_in_lesion"], 0.8, rel_tol=1e-6)
    assert math.isclose(contrast["map_in_other_brain"], 0.2, rel_tol=1e-6)
    assert math.isclose(contrast["map_ratio"], 4.0, rel_tol=1e-6)
    assert math.isclose(contrast["change_in_lesion"], 0.5, rel_tol=1e-6)  # +50 of a 99th percentile of 100
    assert contrast["abs_change_in_other_brain"] == 0.0
