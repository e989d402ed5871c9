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


@pytest.mark.slow
def test_protocol_brats_tiny_runs_every_arm(brats_run: tuple[Path, str]) -> None:
    out, stdout = brats_run
    for step in ("train", "restore", "evaluate"):
        assert f"$ pseudohealthy {step} " in stdout  # the exact commands are printed
    results = json.loads((out / "results.json").read_text())
    assert results["split"]["test"] == ["brats_2013_pat0006_1"]
    assert len(results["split"]["train"]) == 3 and "brats_2013_pat0006_1" not in results["split"]["train"]
    assert set(results["arms"]) == {"ensemble", "single", "baseline"}
    n = len(results["slices"])
    assert n == 3
    for arm, info in results["arms"].items():
        _check_metrics(info["metrics"], n)
        assert Path(info["restore_dir"], "Flair_subtrMeanDivStd_anomaly.nii.gz").is_file(), arm
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
    assert any("--members fold_2" in c for c in cmds)
    assert sum(c.startswith("pseudohealthy evaluate") for c in cmds) == 3
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    labels = [r.split("|")[1].strip() for r in rows[1:]]
    assert labels[0].startswith("conditioned ensemble (2: fold_2, fold_6)")
    assert labels[1].startswith("single conditioned model (fold_2)")
    assert labels[2].startswith("unconditional baseline")
    assert labels[3].startswith("intensity baseline")
    assert sum("paper Table 1" in lab and "different data" in lab for lab in labels) == 2
    assert all(len(r.split("|")) == 9 for r in rows)  # arm + 6 metrics
    assert "| 0.740 |" in table  # the paper's BraTS-T2 AP_p beside ours
    assert _is_png(out / "figure.png")


def test_protocol_brats_reuses_given_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A given run with trained members is reused as it is; an empty one is trained into."""
    protocol = _load("protocol_brats")
    calls: list[list[str]] = []
    monkeypatch.setattr(protocol, "run", lambda cmd, log, capture=False: calls.append(cmd) or "")
    args = argparse.Namespace(brats_dir=tmp_path, device="cpu", seed=0, steps=None, tiny=False)
    given = tmp_path / "given"
    for fold in ("fold_9", "fold_2"):
        (given / fold).mkdir(parents=True)
        (given / fold / "pseudohealthy.json").write_text("{}")
    (given / "log.csv").write_text("")
    assert protocol.members(given) == ["fold_2", "fold_9"]
    assert protocol.train(args, given, "cpu", "2,6,9", [], given=True) == given
    assert calls == []
    protocol.train(args, tmp_path / "empty", "cpu-baseline", "2", [], given=True)
    assert len(calls) == 1 and calls[0][0] == "train"
    cmd = calls[0]
    assert cmd[cmd.index("--preset") + 1] == "cpu-baseline" and cmd[cmd.index("--folds") + 1] == "2"
    assert "--resume" in cmd and cmd[cmd.index("--lesion-masks-pattern") + 1] == "OTMultiClass.nii.gz"
    assert "brats_2013_pat0006_1" not in " ".join(cmd)  # the test patient never trains
    assert [m["name"] for m in protocol.describe(given)] == ["fold_2", "fold_9"]
    leaky = tmp_path / "leaky" / "fold_0"
    leaky.mkdir(parents=True)
    info = {"data": {"files": ["/x/brats_2013_pat0006_1/Flair_subtrMeanDivStd.nii.gz"]}}
    (leaky / "pseudohealthy.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit, match="test patient"):
        protocol.describe(leaky.parent)


def test_protocol_brats_table_has_every_column() -> None:
    protocol = _load("protocol_brats")
    text = protocol.table({"a": {"ap_image": 0.5, "auroc": None, "n_slices": 7}})
    header, _, row = text.splitlines()
    assert header.split("|")[2:-1] == [f" {c} " for c, _ in protocol.COLUMNS]
    assert row == "| a | 0.500 | – | – | – | – | 7 |"


@pytest.mark.slow
def test_protocol_mslub_tiny(tmp_path: Path, shared_data: Path) -> None:
    import SimpleITK  # noqa: F401  (the 'preprocess' extra, installed by setup.sh; fail loudly if missing)

    assert (shared_data / "lesion" / "mslub").is_dir(), "MSLUB scans absent from ../shared/data"
    assert (shared_data / "healthy" / "ixi_t1").is_dir(), "IXI T1 scans absent from ../shared/data"
    proc = _run("protocol_mslub.py", tmp_path)
    for step in ("preprocess", "train", "evaluate"):
        assert f"$ pseudohealthy {step} " in proc.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    _check_metrics(metrics, metrics["n_slices"])
    assert metrics["n_volumes"] == 2 and metrics["n_slices"] == 6  # 3 slices of each patient
    assert metrics["intensity_baseline"]["invert"] is True  # T1: lesions are dark
    table = (tmp_path / "eval" / "table.txt").read_text().splitlines()
    assert table[1].startswith("ensemble") and table[2].startswith("intensity baseline")  # method, baseline
    assert len(table[1].split()) == 2 + len(METRICS) and table[1].split()[-1] == "6"
    summary = json.loads((tmp_path / "protocol.json").read_text())
    assert summary["tiny"] is True and all(s["rc"] == 0 for s in summary["steps"])
    assert _is_png(tmp_path / "eval" / "pr_curve.png") and _is_png(tmp_path / "eval" / "roc_curve.png")
