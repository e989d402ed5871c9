"""Several GPUs or nodes: the process's place in a ``torchrun`` launch (:class:`DistInfo`, read
from ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK``), starting the process group and picking each
rank's device (:func:`init_distributed`), and the small ``torch.distributed`` helpers training
uses, each a no-op in a single process: the active group (:func:`active_dist`), the mean over
ranks, a broadcast from rank 0, gathering one object per rank, a barrier, and the module inside
a DDP wrapper (:func:`unwrap`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pseudohealthy.device import resolve_device
from pseudohealthy.training.config import TrainError

__all__ = [
    "DistInfo",
    "active_dist",
    "barrier",
    "broadcast_from_main",
    "gather_objects",
    "init_distributed",
    "mean_over_ranks",
    "unwrap",
]


@dataclass(frozen=True)
class DistInfo:
    """The process's place in a ``torchrun`` launch (world size 1 without one)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        def get(name: str, default: int) -> int:
            try:
                return int(os.environ.get(name, default))
            except ValueError:
                raise TrainError(f"environment variable {name} must be an integer") from None

        return cls(get("WORLD_SIZE", 1), get("RANK", 0), get("LOCAL_RANK", 0))


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Read the launch from the environment, pick this rank's device, start the process group.

    With ``WORLD_SIZE > 1`` the group is initialised (NCCL on CUDA, gloo on the CPU) unless it
    already is; each rank uses ``cuda:LOCAL_RANK`` when the device is CUDA.
    """
    info = DistInfo.from_env()
    spec = (device or "auto").strip().lower()
    if info.enabled and spec in ("auto", "cuda") and torch.cuda.is_available():
        dev = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    else:
        dev = resolve_device(spec)
    if info.enabled:
        import torch.distributed as dist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def active_dist() -> Any:
    """The ``torch.distributed`` module when a process group is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` averaged over the ranks, in place (unchanged in a single process)."""
    dist = active_dist()
    if dist is not None:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def broadcast_from_main(value: torch.Tensor) -> torch.Tensor:
    """Overwrite ``value`` on every rank with rank 0's, in place."""
    dist = active_dist()
    if dist is not None:
        dist.broadcast(value, src=0)
    return value


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    dist = active_dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    dist = active_dist()
    if dist is not None:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or similar) wrapper; ``model`` itself otherwise."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
