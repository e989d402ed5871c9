"""CPU bfloat16 detection, what precision "auto" gives, and the accuracy of bf16 restorations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pseudohealthy import device as dev
from pseudohealthy.engine.frame import restore_frame
from pseudohealthy.engine.reference import random_ensemble
from pseudohealthy.engine.sampler import SamplerPlan
from pseudohealthy.model.checkpoint import Ensemble

BF16_MAP_TOLERANCE = 2e-3
"""Largest |bf16 - fp32| of a 1 - SSIM map we accept: 4x the 4.9e-4 (mean 2.9e-5) measured by the
test below (tiny random member, DDIM 5 steps) on an AMD EPYC without bf16 instructions; 1.9e-5
(mean 1.7e-6) on one with avx512_bf16 (2026-12-02)."""

X86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 {extra}\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\nCPU implementer\t: 0x41\n"


@pytest.fixture
def cpuinfo(tmp_path: Path, monkeypatch):
    """Write a fake ``/proc/cpuinfo`` and point the detection at it (cache cleared around)."""

    def fake(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(dev, "CPUINFO", path)
        dev.cpu_bf16_flag.cache_clear()

    yield fake
    dev.cpu_bf16_flag.cache_clear()


@pytest.mark.parametrize(
    ("text", "flag"),
    [
        (X86.format(extra="avx512f avx512_bf16"), "avx512_bf16"),
        (X86.format(extra="amx_tile amx_bf16 avx512_bf16"), "amx_bf16"),
        (ARM.format(extra="sve bf16 i8mm"), "bf16"),
        (X86.format(extra="avx512f avx512_vnni"), None),
        (ARM.format(extra="sve i8mm"), None),
    ],
)
def test_cpu_bf16_flag_from_cpuinfo(cpuinfo, text: str, flag: str | None) -> None:
    cpuinfo(text)
    assert dev.cpu_bf16_flag() == flag and dev.cpu_supports_bf16() is (flag is not None)
    auto = dev.autocast_dtype("cpu", "auto")
    assert auto is (torch.bfloat16 if flag else None)
    assert dev.autocast_dtype("cpu", "fp32") is None  # an explicit choice wins
    line = dev.describe_precision("cpu", "auto")
    if flag:
        assert line == f"precision: bf16 autocast (auto: CPU has {flag})"
    else:
        assert line.startswith("precision: fp32 (auto: CPU lacks ") and "avx512_bf16" in line
        assert "emulated" in dev.describe_precision("cpu", "bf16")
    with dev.autocast("cpu", "auto") as dtype:
        assert dtype is auto and torch.is_autocast_enabled("cpu") is (flag is not None)


def test_this_machine_matches_its_cpuinfo() -> None:
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    words = set(path.read_text().split())
    dev.cpu_bf16_flag.cache_clear()
    assert dev.cpu_supports_bf16() is bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def test_explicit_precisions_are_described() -> None:
    assert dev.describe_precision("cpu", "fp32") == "precision: fp32 (fp32 requested)"
    assert dev.describe_precision("cpu", "fp16").startswith("precision: fp16 autocast (fp16 requested")
    with pytest.raises(dev.DeviceError):
        dev.describe_precision("cpu", "fp8")


def test_bf16_maps_stay_within_the_tolerance_of_fp32(tmp_path: Path) -> None:
    """bf16 autocast runs on any CPU (emulated where the instructions are missing, with the same
    rounding of operands to bf16), so the tolerance is checked everywhere, not only where the CPU
    has bf16; only the speed differs."""
    ensemble = Ensemble.from_dir(random_ensemble(tmp_path, "tiny", 1))
    rng = np.random.default_rng(0)
    size = ensemble.image_size
    yy, xx = np.mgrid[:size, :size]
    fg = np.broadcast_to((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2, (2, size, size))
    images = np.where(fg, rng.uniform(0.3, 0.9, (2, size, size)), 0).astype(np.float32)
    plan = SamplerPlan.for_ensemble("ddim", 5, ensemble.schedule, conditioned=ensemble.conditioned)
    models = [m.model("cpu") for m in ensemble.members]
    names = [m.name for m in ensemble.members]
    maps = {
        p: restore_frame(
            models, names, images, fg, [0, 1], plan, ensemble.schedule,
            seed=0, conditioned=ensemble.conditioned, device="cpu", precision=p,
        ).member_maps
        for p in ("fp32", "bf16")
    }  # fmt: skip
    diff = np.abs(maps["bf16"] - maps["fp32"])[:, fg]
    assert 0 < diff.max() < BF16_MAP_TOLERANCE, diff.max()  # > 0: bf16 really ran
