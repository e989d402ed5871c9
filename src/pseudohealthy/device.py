"""Choosing the compute device and the mixed-precision dtype."""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
from collections.abc import Iterator
from pathlib import Path

import torch

from pseudohealthy.engine.defaults import PRECISIONS
from pseudohealthy.errors import PseudohealthyError

__all__ = [
    "CPU_BF16_FLAGS",
    "DeviceError",
    "autocast",
    "autocast_dtype",
    "available_devices",
    "cpu_bf16_flag",
    "cpu_supports_bf16",
    "describe_precision",
    "resolve_device",
]

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")
"""CPU feature flags (``/proc/cpuinfo``) with native bfloat16 arithmetic, in order of preference:
Intel AMX and AVX512-BF16 (Cooper Lake, Sapphire Rapids, AMD Zen 4 and later), Arm ``bf16``."""

_BF16_RULE = "/".join(CPU_BF16_FLAGS)
CPUINFO = Path("/proc/cpuinfo")  # Linux; read once by cpu_bf16_flag


class DeviceError(PseudohealthyError):
    """A requested device or precision is not available on this machine."""


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA if available, else CPU with a notice), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        log.warning("No CUDA GPU available: running on the CPU, which is much slower.")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{spec}' requested but CUDA is not available (use 'cpu' or 'auto')")
        if spec == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        index = spec.split(":", 1)[1]
        count = torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise DeviceError(f"device '{spec}' does not exist: this machine has cuda:0..cuda:{count - 1}")
        return torch.device("cuda", int(index))
    raise DeviceError(f"unknown device '{spec}': use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def available_devices() -> list[str]:
    """Choices for a device picker: ``["auto", "cuda:0", ..., "cpu"]``."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return ["auto", *[f"cuda:{i}" for i in range(n)], "cpu"]


def _cpuinfo_flags(text: str) -> set[str]:
    """Feature flags named in ``/proc/cpuinfo`` text (x86 ``flags``, Arm ``Features`` lines)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


@functools.lru_cache(maxsize=1)
def cpu_bf16_flag() -> str | None:
    """The first of :data:`CPU_BF16_FLAGS` this CPU has; None when it has none.

    Read from ``/proc/cpuinfo`` on Linux; elsewhere from
    ``torch.backends.cpu.get_cpu_capability()`` (which names bf16 only on some builds).
    """
    try:
        flags = _cpuinfo_flags(CPUINFO.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        flags = set()
    if not flags and platform.system() != "Linux":
        flags = {torch.backends.cpu.get_cpu_capability().lower()}
    return next((f for f in CPU_BF16_FLAGS if f in flags), None)


def cpu_supports_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (one of :data:`CPU_BF16_FLAGS`)."""
    return cpu_bf16_flag() is not None


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means full float32.

    ``auto``: bfloat16 on CUDA where supported, else float16; on the CPU bfloat16 where the CPU
    does it natively (:func:`cpu_supports_bf16`), else float32 (None).
    ``fp16`` / ``bf16`` are honoured on any device (bf16 on CUDA needs hardware support).
    """
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    is_cuda = device.type == "cuda"
    if precision == "bf16":
        if is_cuda and not torch.cuda.is_bf16_supported():
            raise DeviceError(f"bfloat16 is not supported on {device}; use 'fp16' or 'fp32'")
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else None
    if not is_cuda:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[dtype]


def describe_precision(device: torch.device | str, precision: str = "auto") -> str:
    """One line naming what ``precision`` gives on ``device`` and why, for the start of a run.

    E.g. ``"precision: bf16 autocast (auto: CPU has avx512_bf16)"`` or ``"precision: fp32 (auto:
    CPU lacks amx_bf16/avx512_bf16/bf16)"``. Raises :class:`DeviceError` as :func:`autocast_dtype`.
    """
    device = torch.device(device)
    name = _dtype_name(autocast_dtype(device, precision))
    flag = cpu_bf16_flag() if device.type == "cpu" else None
    if precision != "auto":
        slow = precision == "bf16" and device.type == "cpu" and flag is None
        why = f"{precision} requested" + (f"; the CPU lacks {_BF16_RULE}: emulated, slow" if slow else "")
    elif device.type == "cpu":
        why = f"auto: CPU has {flag}" if flag else f"auto: CPU lacks {_BF16_RULE}"
    elif device.type == "cuda":
        why = f"auto: {device} {'supports' if torch.cuda.is_bf16_supported() else 'lacks'} bf16"
    else:
        why = f"auto on {device.type}"
    return f"precision: {name} ({why})"


@contextlib.contextmanager
def autocast(device: torch.device | str, precision: str = "auto") -> Iterator[torch.dtype | None]:
    """``torch.autocast`` for :func:`autocast_dtype` (a no-op for float32); yields the dtype."""
    device = torch.device(device)
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        yield None
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield dtype
