"""``benchmarks/bench_ssim.py --tiny`` runs end to end: both constants scored on the same slices."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recompute import assert_close, intensity_scores, pixel_metrics, slice_metrics, ssim_map

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ssim.py"


@pytest.fixture(scope="module")
def ssim_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``bench_ssim.py --tiny --save-arrays`` once for the module: its output folder."""
    out = tmp_path_factory.mktemp("bench_ssim")
    spec = importlib.util.spec_from_file_location("bench_ssim", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--tiny", "--out", str(out), "--save-arrays"]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark pins one thread
    return out


def test_bench_ssim_tiny(ssim_run: Path) -> None:
    assert (ssim_run / "ssim.png").stat().st_size > 1000
    summary = json.loads((ssim_run / "ssim.json").read_text())
    synthetic, real = summary["results"].values()
    arms = {"unit ensemble", "faithful ensemble", "intensity baseline"}
    assert arms | {"unit held-out member", "faithful held-out member"} == set(synthetic)
    assert arms == set(real)
    n_syn, n_real = summary["n_slices"].values()
    assert n_syn == 2 * 2 and n_real == 2  # corrupted slices and their clean copies; tumour slices
    for rows in (synthetic, real):
        for metrics in rows.values():
            assert 0.0 < metrics["ap_pixel"] <= 1.0 and 0.0 < metrics["best_dice"] <= 1.0
    # clean copies make slice labels vary on the synthetic source only
    assert synthetic["unit ensemble"]["auroc"] is not None and real["unit ensemble"]["auroc"] is None
    rows = [line for line in (ssim_run / "ssim.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(synthetic) + len(real)


def test_bench_ssim_arms_recompute_from_one_restoration(ssim_run: Path) -> None:
    """Every reported arm equals scikit-image SSIM (data range 1 or 255) of the one saved set of
    restorations, member maps averaged, scored with scikit-learn; tolerance 1e-6."""
    summary = json.loads((ssim_run / "ssim.json").read_text())
    with np.load(ssim_run / "ssim.npz", allow_pickle=False) as saved:
        arrays = {key: saved[key] for key in saved.files}
    assert list(arrays["sources"]) == list(summary["results"])
    for i, (source, rows) in enumerate(summary["results"].items()):
        images, labels, fg = (arrays[f"s{i}_{k}"] for k in ("images", "labels", "fg"))
        restorations = arrays[f"s{i}_restorations"]  # (members, slices, S, S), shared by both arms
        assert restorations.shape == (2, *images.shape)
        maps = {}
        for arm, data_range in (("unit", 1.0), ("faithful", 255.0)):
            member = np.stack([ssim_map(r, images, fg, data_range) for r in restorations])
            maps[arm] = np.where(fg, member.mean(axis=0, dtype=np.float64).astype(np.float32), 0.0)
            expected = pixel_metrics(maps[arm], labels) | slice_metrics(maps[arm], labels)
            assert_close(rows[f"{arm} ensemble"], expected, 1e-6, (source, arm))
            if f"s{i}_owner" in arrays:
                owner = arrays[f"s{i}_owner"]
                own = member[owner, np.arange(owner.size)]
                expected = pixel_metrics(own, labels) | slice_metrics(own, labels)
                assert_close(rows[f"{arm} held-out member"], expected, 1e-6, (source, arm))
        assert maps["faithful"].max() < maps["unit"].max()  # C1, C2 65,025 times larger: smaller maps
        baseline = intensity_scores(images, fg.astype(bool))
        expected = pixel_metrics(baseline, labels) | slice_metrics(baseline, labels)
        assert_close(rows["intensity baseline"], expected, 1e-6, (source, "baseline"))
