"""``benchmarks/bench_steps.py --tiny`` runs end to end and writes the plot, table and JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_steps.py"


def test_bench_steps_tiny(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_steps", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread

    assert (tmp_path / "steps.png").stat().st_size > 1000
    rows = [line for line in (tmp_path / "steps.md").read_text().splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in rows[1:]]  # skip the header
    assert [c[:3] for c in cells] == [
        ["ddpm (reference)", "5", "10"],  # 2 tiny members x 5 steps
        ["ddim", "2", "4"],
        ["ddim", "5", "10"],
        ["dpm", "2", "4"],
        ["dpm", "5", "10"],
    ]
    summary = json.loads((tmp_path / "steps.json").read_text())
    assert len(summary["rows"]) == 4 and summary["reference"]["steps"] == 5
    for row in [summary["reference"], *summary["rows"]]:
        for source in ("synthetic", "real"):
            assert 0.0 < row[source]["ap_pixel"] <= 1.0
            assert 0.0 < row[source]["best_dice"] <= 1.0
    assert len(summary["real_slices"]) == 2
    assert "cheapest within 0.01 AP_p" in capsys.readouterr().out
