"""What the speed benchmarks share: UNet FLOPs (per pass, and per stage of the UNet), the device's
dense bf16 peak (looked up by name, or measured with a large matrix product) and the versions of
the CUDA stack. Used by ``bench_restore.py`` and ``gpu_check.py``.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import torch

# dense bf16 tensor-core peak, TFLOP/s, by a fragment of torch.cuda.get_device_name() (first match)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))

_TOP = "ConditionedUNet.unet."


def device_peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from :data:`PEAK_TFLOPS`; None when unknown (or a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def _counted_pass(preset: str) -> dict[str, dict[Any, int]]:
    """``FlopCounterMode.get_flop_counts()`` of one forward pass of ``preset`` for one slice.

    Counted on the meta device (no computation), so the figure is the same on every device.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    from pseudohealthy.model import network as model

    def sdpa(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(q, k, v)

    # the CPU's fused attention kernel has no formula of its own: count it as the CUDA ones
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    custom = {cpu_sdpa: sdpa} if cpu_sdpa is not None else {}
    cfg = model.get_preset(preset)
    net, size, device = model.build_model(cfg).eval().to("meta"), cfg.image_size, torch.device("meta")
    x = torch.zeros(1, 1, size, size, device=device)
    t = torch.full((1,), 500, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as counter:
        net(x, t, x if cfg.conditioned else None)
    return counter.get_flop_counts()


def unet_flops(preset: str) -> int:
    """FLOPs of one forward pass of ``preset`` for one slice (a multiply-add counts 2)."""
    return int(sum(_counted_pass(preset)["Global"].values()))


def _kind(op: Any) -> str:
    name = str(op)
    if "convolution" in name:
        return "convolution"
    if "bmm" in name or "scaled_dot_product" in name:
        return "attention"  # the QK^T and attention-times-V products
    return "linear"  # projections, time embedding


def unet_flops_by_stage(preset: str) -> dict[str, dict[str, float]]:
    """GFLOP of one forward pass per stage of the UNet (``conv_in``, ``down_blocks.0`` ..,
    ``middle_block``, ``up_blocks.0`` .., ``out``), each split into ``convolution``, ``attention``
    (the score and value products) and ``linear``, with a ``total``; in forward order."""
    stages: dict[str, dict[str, float]] = {}
    for module, ops in _counted_pass(preset).items():
        if not module.startswith(_TOP):
            continue
        parts = module[len(_TOP) :].split(".")
        depth = 2 if parts[0] in ("down_blocks", "up_blocks") else 1
        if len(parts) != depth:
            continue
        stage = stages.setdefault(".".join(parts), {"convolution": 0.0, "attention": 0.0, "linear": 0.0})
        for op, flops in ops.items():
            stage[_kind(op)] += flops / 1e9
    for stage in stages.values():
        stage["total"] = sum(stage.values())
    return stages


def matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Measured dense matrix-product rate in TFLOP/s: bf16 ``n`` x ``n`` on CUDA (CUDA events,
    after 3 warm-ups), float32 on the CPU (a smaller ``n`` is wise there)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        seconds = time.perf_counter() - t0
    return 2 * n**3 * repeats / seconds / 1e12


def _driver_version() -> str | None:
    """The NVIDIA driver's version (NVML, else ``nvidia-smi``); None when neither answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # no NVML binding or no driver: ask nvidia-smi
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    """torch, its CUDA build, cuDNN, NCCL, the driver and every visible GPU (name, capability,
    memory, multiprocessors); the CUDA keys are None on a CPU build or without a device."""
    available = torch.cuda.is_available()
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": available,
        "cudnn": torch.backends.cudnn.version() if available else None,
        "nccl": None,
        "driver": _driver_version() if available else None,
        "gpus": [],
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if available:
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # a build without NCCL
            info["nccl"] = None
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "multiprocessors": props.multi_processor_count,
                }
            )
    return info
