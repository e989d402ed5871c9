"""``benchmarks/bench_recipe.py`` on a tiny random member: rows per setting, passes, fidelity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from benchmark_modules import load_benchmark


def _bench():
    return load_benchmark("bench_recipe")


def test_bench_recipe_tiny_member(tmp_path: Path) -> None:
    from pseudohealthy.data.sample import sample_mask_path, sample_scan_path
    from pseudohealthy.engine.reference import random_ensemble

    random_ensemble(tmp_path / "ens", "tiny", 1)
    threads = torch.get_num_threads()
    try:
        rc = _bench().main(
            [str(tmp_path / "ens" / "fold0"), "--healthy", str(sample_scan_path()), "--healthy-lesion",
             str(sample_mask_path()), "--slices", "2", "--configs", "ddim:2,onepass:3",
             "--out", str(tmp_path / "o")]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    (arm,) = json.loads((tmp_path / "o" / "recipe.json").read_text())["arms"]
    assert arm["prediction"] == "epsilon"
    assert [(r["sampler"], r["steps"], r["unet_passes"]) for r in arm["rows"]] == [
        ("ddim", 2, 2),
        ("onepass", 3, 3),
    ]
    for row in arm["rows"]:
        assert 0.0 <= row["ap_pixel"] <= 1.0 and -1.0 <= row["val_ssim_out"] <= 1.0
        assert np.isfinite(row["val_psnr_out"]) and row["val_psnr_out"] < 100.0  # a random member is no copy
    assert (tmp_path / "o" / "recipe.png").stat().st_size > 1000


def test_configs_take_an_optional_spacing() -> None:
    import pytest

    from pseudohealthy.engine.defaults import DEFAULT_SPACING

    parse = _bench()._parse_configs
    assert parse("ddim:2:trailing,ddpm:5") == [("ddim", 2, "trailing"), ("ddpm", 5, DEFAULT_SPACING)]
    with pytest.raises(SystemExit, match="unknown spacing 'sideways'"):
        parse("ddim:2:sideways")


def test_precision_reaches_the_network(tmp_path: Path) -> None:
    """``--precision bf16`` restores in bf16 autocast (other figures than fp32's) and is recorded."""
    from pseudohealthy.data.sample import sample_mask_path, sample_scan_path
    from pseudohealthy.engine.reference import random_ensemble

    random_ensemble(tmp_path / "ens", "tiny", 1)
    threads = torch.get_num_threads()
    runs = {}
    try:
        for precision in ("fp32", "bf16"):
            out = tmp_path / precision
            _bench().main(
                [str(tmp_path / "ens" / "fold0"), "--healthy", str(sample_scan_path()), "--healthy-lesion",
                 str(sample_mask_path()), "--slices", "2", "--configs", "ddim:2", "--precision", precision,
                 "--out", str(out)]
            )  # fmt: skip
            runs[precision] = json.loads((out / "recipe.json").read_text())
    finally:
        torch.set_num_threads(threads)
    assert [runs[p]["precision"] for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    (fp32,), (bf16,) = (runs[p]["arms"][0]["rows"] for p in ("fp32", "bf16"))
    assert fp32["val_psnr_out"] != bf16["val_psnr_out"]
    assert abs(fp32["val_psnr_out"] - bf16["val_psnr_out"]) < 3.0  # the same restoration, rounded
