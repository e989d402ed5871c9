"""Choosing the compute device and the mixed-precision dtype."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from pseudohealthy.engine.defaults import PRECISIONS
from pseudohealthy.errors import PseudohealthyError

__all__ = ["DeviceError", "autocast", "autocast_dtype", "available_devices", "resolve_device"]

log = logging.getLogger(__name__)



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


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; ``None`` means full float32.

    ``auto``: bfloat16 on CUDA where supported, else float16; float32 (None) on the CPU.
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
    if not is_cuda:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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
