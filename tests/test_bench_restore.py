"""``benchmarks/bench_restore.py`` runs end to end on a tiny configuration and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_restore.py"


def test_bench_restore_tiny_reports_engine_and_naive(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(SCRIPT), "--presets", "tiny:2", "--slices", "3", "--sampler", "ddim"]
    cmd += ["--steps", "2", "--device", "cpu", "--repeats", "3", "--json", str(out)]
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speed-up (naive / engine)" in proc.stdout and "medians of 3 interleaved runs" in proc.stdout
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and len(figures["presets"]) == 1
    fig = figures["presets"][0]
    assert (fig["preset"], fig["members"], fig["slices"], fig["naive_slices"]) == ("tiny", 2, 3, 3)
    assert fig["max_abs_map_difference"] < 1e-4  # the engine gives the naive loop's maps
    for name in ("engine", "naive"):
        r = fig[name]
        assert r["seconds"] > 0 and r["slices_per_s"] > 0 and r["peak_host_mib"] > 0
        assert r["s_per_volume"] == r["seconds"] / 3 * fig["foreground_slices_in_volume"]
        assert r["peak_gpu_mib"] is None and r["fraction_of_peak"] is None  # no CUDA here
    assert fig["speedup"] == fig["naive"]["s_per_volume"] / fig["engine"]["s_per_volume"]
    assert {k: len(v) for k, v in fig["runs_s"].items()} == {"engine": 3, "one": 3, "naive": 3}
    for name in ("engine", "naive"):
        assert fig[name]["seconds"] == sorted(fig["runs_s"][name])[1]  # the median of the 3 runs
    assert "compiled" not in fig and fig["compile"] is None
    assert fig["unet_gflop_per_pass"] > 0 and fig["engine_one_slice_s"] > 0
