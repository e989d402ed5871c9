"""``benchmarks/bench_restore.py`` runs end to end on a tiny configuration and reports its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score

from recompute import mask

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


def test_bench_restore_precision_compare_reports_ratio_and_map_differences(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    cmd = [sys.executable, str(SCRIPT), "--precision-compare", "--presets", "tiny:1", "--slices", "2"]
    cmd += ["--sampler", "ddim", "--steps", "2", "--device", "cpu", "--repeats", "3", "--json", str(out)]
    cmd += ["--save-maps", str(tmp_path)]  # the maps behind the figures, recomputed below
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fp32/bf16 time ratio" in proc.stdout
    (fig,) = json.loads(out.read_text())["precision_compare"]
    ref, low = fig["fp32"], fig["bf16"]
    assert {k: len(v) for k, v in fig["runs_s"].items()} == {"fp32": 3, "bf16": 3}
    for name, r in (("fp32", ref), ("bf16", low)):
        assert r["seconds"] == sorted(fig["runs_s"][name])[1]  # the median of the 3 runs
    assert fig["wall_ratio"] == ref["seconds"] / low["seconds"]
    assert ref["max_abs_map_difference"] == 0 == ref["mean_abs_map_difference"]  # the reference itself
    assert 0 < low["mean_abs_map_difference"] <= low["max_abs_map_difference"]
    assert fig["lesion_pixels"] > 0 and 0 < ref["ap_pixel"] <= 1
    assert fig["ap_pixel_difference"] == low["ap_pixel"] - ref["ap_pixel"]
    assert fig["precisions"]["bf16"].startswith("precision: bf16 autocast")
    _check_recomputed(fig, tmp_path / "tiny_maps.npz")


def _check_recomputed(fig: dict, saved_maps: Path) -> None:
    """AP_p of each precision is scikit-learn's on its saved maps against the sample scan's lesion
    mask (read with nibabel) at the saved slices (tolerance 1e-9); the map differences and the
    lesion pixel count are numpy's on the same arrays (1e-12)."""
    from pseudohealthy.data.sample import sample_mask_path

    with np.load(saved_maps, allow_pickle=False) as saved:
        slices, fg = saved["slices"], saved["foreground"]
        maps = {name: saved[name].astype(np.float64) for name in ("fp32", "bf16")}
    labels = mask(sample_mask_path())[:, :, slices]
    assert len(slices) == fig["slices"] and int(labels.sum()) == fig["lesion_pixels"]
    for name, amap in maps.items():
        ap = average_precision_score(labels.ravel(), amap.ravel())
        assert abs(fig[name]["ap_pixel"] - ap) <= 1e-9, (name, fig[name]["ap_pixel"], ap)
        diff = np.abs(amap - maps["fp32"])[fg]
        assert abs(fig[name]["max_abs_map_difference"] - diff.max()) <= 1e-12, (name, diff.max())
        assert abs(fig[name]["mean_abs_map_difference"] - diff.mean()) <= 1e-12, (name, diff.mean())
