"""``benchmarks/plot_training.py``: curves and last rows read back from a member's ``log.csv``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from benchmark_modules import load_benchmark
from pseudohealthy.training.config import LOG_FIELDS


def _bench():
    return load_benchmark("plot_training")


def _member(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    with (folder / "log.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return folder


def test_last_validation_rows_and_cpu_hours(tmp_path: Path, capsys) -> None:
    rows = [
        {"step": 100, "loss": 0.5, "time": 360.0, "lr": 1e-4},  # no validation: not a point
        {
            "step": 200,
            "loss": 0.1,
            "val_loss": 0.02,
            "val_ap": 0.25,
            "val_ssim_out": 0.70,
            "val_psnr_out": 22.0,
            "time": 720.0,
            "lr": 1e-4,
        },
        {
            "step": 400,
            "loss": 0.1,
            "val_loss": 0.01,
            "val_ap": 0.31,
            "val_ssim_out": 0.88,
            "val_psnr_out": 28.4,
            "time": 1800.0,
            "lr": 1e-4,
        },
    ]
    new = _member(tmp_path / "v" / "fold_2", rows)
    old = _member(tmp_path / "eps" / "fold_2", [{"step": 800, "val_ap": 0.4, "time": 7200.0}])
    out = tmp_path / "out"
    assert _bench().main([str(new), str(old), "--cores-per-run", "0.5", "--out", str(out)]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["curves"]["v/fold_2"]["step"] == [200, 400]
    assert record["curves"]["v/fold_2"]["cpu_hours"] == pytest.approx([0.1, 0.25])
    last = {r["member"]: r for r in record["last"]}
    assert last["v/fold_2"]["val_ssim_out"] == pytest.approx(0.88)
    assert last["eps/fold_2"]["val_ssim_out"] is None  # NaN written as null
    assert last["eps/fold_2"]["cpu_hours"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "| v/fold_2 | 400 | 0.25 | 0.310 | 0.880 | 28.4 |" in printed
    assert "| eps/fold_2 | 800 | 1.00 | 0.400 | - | - |" in printed
    assert (out / "training.png").stat().st_size > 1000


def test_labels_must_match_members(tmp_path: Path) -> None:
    member = _member(tmp_path / "run" / "fold_0", [{"step": 1, "val_ap": 0.1, "time": 1.0}])
    with pytest.raises(SystemExit, match="2 labels for 1 members"):
        _bench().main([str(member), "--labels", "a,b", "--out", str(tmp_path / "o")])


def test_cores_per_run_per_member(tmp_path: Path) -> None:
    """One share per member scales each member's CPU-hours by its own share; counts must match."""
    one = _member(tmp_path / "a" / "fold_2", [{"step": 200, "val_ap": 0.1, "time": 3600.0}])
    two = _member(tmp_path / "b" / "fold_2", [{"step": 200, "val_ap": 0.2, "time": 3600.0}])
    out = tmp_path / "out"
    assert _bench().main([str(one), str(two), "--cores-per-run", "0.5,0.25", "--out", str(out)]) == 0
    curves = json.loads((out / "training.json").read_text())["curves"]
    assert curves["a/fold_2"]["cpu_hours"] == pytest.approx([0.5])
    assert curves["b/fold_2"]["cpu_hours"] == pytest.approx([0.25])
    with pytest.raises(SystemExit, match="3 shares for 2 members"):
        _bench().main([str(one), str(two), "--cores-per-run", "1,1,1", "--out", str(out)])
    with pytest.raises(SystemExit, match="must be positive"):
        _bench().main([str(one), "--cores-per-run", "0", "--out", str(out)])
