"""The real-data protocols under ``benchmarks/`` run end to end in their ``--tiny`` smoke mode."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
METRICS = ("ap_image", "auroc", "ap_pixel", "best_dice", "dice_at_5fpr", "n_slices")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.slow
def test_protocol_brats_tiny_runs_every_arm(brats_run: tuple[Path, str]) -> None:
    out, stdout = brats_run
    results = _check_arms(out, stdout, tests=["brats_2013_pat0006_1"], n_per_test=3)
    assert len(results["split"]["train"]) == 3 and "brats_2013_pat0006_1" not in results["split"]["train"]
    assert "| 0.740 |" in (out / "table.md").read_text()  # the paper's BraTS-T2 AP_p beside ours
    for info in results["arms"].values():
        assert Path(
            info["restore_dir"], "brats_2013_pat0006_1", "Flair_subtrMeanDivStd_anomaly.nii.gz"
        ).is_file()


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


@pytest.mark.slow
def test_protocol_mslub_tiny_runs_every_arm(tmp_path: Path, shared_data: Path) -> None:
    import SimpleITK  # noqa: F401  (the 'preprocess' extra, installed by setup.sh; fail loudly if missing)

    assert (shared_data / "lesion" / "mslub").is_dir(), "MSLUB scans absent from ../shared/data"
    assert (shared_data / "healthy" / "ixi_t1").is_dir(), "IXI T1 scans absent from ../shared/data"
    proc = _run("protocol_mslub.py", tmp_path)
    assert "$ pseudohealthy preprocess " in proc.stdout
    results = _check_arms(tmp_path, proc.stdout, tests=["patient07", "patient19"], n_per_test=3)
    assert results["intensity_baseline"]["invert"] is True  # T1: lesions are dark
    for arm in results["arms"].values():
        assert json.loads(Path(arm["eval_dir"], "metrics.json").read_text())["n_volumes"] == 2
    cmds = [c["command"].split()[1] for c in results["commands"]]
    # IXI into MNI, two trainings, each MSLUB patient into the same frame (lesion mask carried), arms
    assert cmds[:5] == ["preprocess", "train", "train", "preprocess", "preprocess"]
    assert (tmp_path / "mslub_mni/patient07/T1_mask.nii.gz").is_file()
    train_files = [f for m in results["arms"]["ensemble"]["training"] for f in m["train_files"]]
    assert train_files and all("ixi_mni" in f and "IXI" in f for f in train_files)  # healthy IXI only
    assert "| 0.250 |" in (tmp_path / "table.md").read_text()  # the paper's ATLAS T1 AP_p for orientation


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
