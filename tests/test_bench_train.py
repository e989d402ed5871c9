"""``benchmarks/bench_train.py`` times fp32 and bf16 training steps and reports their ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def test_bench_train_tiny_reports_steps_per_second_and_the_ratio(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(SCRIPT), "--presets", "tiny", "--batch-size", "2", "--steps", "2"]
    cmd += ["--repeats", "3", "--json", str(out)]
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "bf16/fp32 steps/s" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu"
    (fig,) = figures["presets"]
    assert (fig["preset"], fig["batch_size"], fig["steps_per_block"]) == ("tiny", 2, 2)
    for name in ("fp32", "bf16"):
        blocks = fig["blocks_s"][name]
        assert len(blocks) == 3 and min(blocks) > 0
        assert fig[name]["steps_per_s"] == 2 / float(np.median(blocks))
        assert np.isfinite(fig[name]["last_mean_loss"]) and fig[name]["last_mean_loss"] > 0
    assert fig["speed_ratio"] == fig["bf16"]["steps_per_s"] / fig["fp32"]["steps_per_s"]
    assert fig["fp32"]["precision"] == "precision: fp32 (fp32 requested)"
    assert fig["bf16"]["precision"].startswith("precision: bf16 autocast")
