"""``benchmarks/bench_steps.py --tiny`` runs end to end and writes the plot, table and JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch

from recompute import assert_close, mask, padded_frame, pixel_metrics

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_steps.py"


def test_bench_steps_tiny(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_steps", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--out", str(tmp_path), "--save-maps"]) == 0
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
        ["onepass", "1", "2"],  # K = 1 and 5 single passes from pure noise
        ["onepass", "5", "10"],
    ]
    summary = json.loads((tmp_path / "steps.json").read_text())
    assert len(summary["rows"]) == 6 and summary["reference"]["steps"] == 5
    for row in [summary["reference"], *summary["rows"]]:
        for source in ("synthetic", "real"):
            assert 0.0 < row[source]["ap_pixel"] <= 1.0
            assert 0.0 < row[source]["best_dice"] <= 1.0
    assert len(summary["real_slices"]) == 2
    assert "cheapest within 0.01 AP_p" in capsys.readouterr().out
    _check_recomputed(tmp_path / "maps", summary)


def _check_recomputed(maps_dir: Path, summary: dict) -> None:
    """Every row's AP_p and best Dice equal scikit-learn's on its saved maps (tolerance 1e-6):
    synthetic against the saved anomaly masks in the model frame; real against the sample scan's
    lesion mask (read with nibabel) at the reported slices, both padded and resized to 128 px."""
    from pseudohealthy.data.sample import sample_mask_path

    slices = summary["real_slices"]
    lesion = padded_frame(mask(sample_mask_path()), slices, 128) > 0.4
    for row in [summary["reference"], *summary["rows"]]:
        with np.load(maps_dir / f"{row['sampler']}_{row['steps']}.npz", allow_pickle=False) as saved:
            syn_maps, syn_labels = saved["synthetic_maps"], saved["synthetic_labels"]
            real_maps, real_fg = saved["real_maps"], saved["real_fg"]
        assert syn_labels.any() and real_maps.shape[2] == len(slices)
        assert_close(row["synthetic"], pixel_metrics(syn_maps, syn_labels), 1e-6, row["sampler"])
        assert not real_maps[~real_fg].any()  # the map is 0 outside the brain
        real = np.clip(padded_frame(real_maps, range(len(slices)), 128), 0.0, 1.0)
        assert_close(row["real"], pixel_metrics(real, lesion), 1e-6, row["sampler"])
