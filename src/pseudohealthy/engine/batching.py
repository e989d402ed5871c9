"""The restoration engine's inner loop: per-slice seeds and noise, batch sizes, batched denoising.

Kept apart from :mod:`pseudohealthy.engine.restore` so the hot loop (:func:`_denoise_batch`) can be
optimised on its own. Nothing here touches scans or maps.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pseudohealthy.device import autocast
from pseudohealthy.model.diffusion import Schedule, denoise_steps, sampler_timesteps, slice_noise

if TYPE_CHECKING:
    from pseudohealthy.engine.restore import RestoreSettings

__all__ = [
    "COMPILE_MODES",
    "DEFAULT_T_START",
    "compiled",
    "default_batch_size",
    "member_key",
    "noise_draws",
    "run_timesteps",
    "slice_seed",
]

DEFAULT_T_START = 250
"""Partial-noising depth for an unconditioned (baseline) ensemble: the input is noised to
t = 250 of 1000 and denoised from there (AnoDDPM, Wyatt et al. 2022, found 250 a good
balance: enough noise to remove lesions, little enough to keep the anatomy)."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""``torch.compile`` modes for restoration (``reduce-overhead`` adds CUDA graphs on a GPU)."""

CPU_BATCH = 8
CUDA_BATCH_128 = 32  # slices per batch at 128 px on a GPU; scaled by area for other sizes
MAX_BATCH = 256


def compiled(model: nn.Module, mode: str | None) -> nn.Module:
    """``model`` wrapped by ``torch.compile`` in ``mode`` (None: unchanged).

    Shapes are static (``dynamic=False``): a new batch size compiles once more. Dynamo treats
    module parameters as inputs, so members of one architecture share the compiled code.
    """
    if mode is None:
        return model
    return torch.compile(model, mode=mode, dynamic=False)


def member_key(name: str) -> int:
    """A stable integer for a member name (its seeds do not depend on the other members)."""
    return zlib.crc32(name.encode("utf-8"))


def slice_seed(seed: int, index: int, member: str) -> int:
    """The torch seed of canonical axial slice ``index`` restored by member ``member``.

    Derived with ``np.random.SeedSequence([seed, index, crc32(member)])``, so it depends only on
    the run seed, the slice and the member: not on the batch, the order or the other members.
    """
    return int(np.random.SeedSequence([int(seed), int(index), member_key(member)]).generate_state(1)[0])


def run_timesteps(settings: RestoreSettings, schedule: Schedule, t_start: int | None) -> list[int]:
    """The timesteps a run visits (one network call per member each)."""
    ts = sampler_timesteps(settings.sampler, settings.steps, schedule.T, schedule)
    return ts if t_start is None else [t_start] + [t for t in ts if t < t_start]


def noise_draws(sampler: str, n_steps: int) -> int:
    """Noise draws per slice: the start, plus one per step for the stochastic ``ddpm``."""
    return n_steps if sampler == "ddpm" else 1


def default_batch_size(device: torch.device, image_size: int) -> int:
    """Slices per batch when the settings leave it open (a CUDA out-of-memory halves it)."""
    if device.type != "cuda":
        return CPU_BATCH
    scaled = CUDA_BATCH_128 * (128 / max(image_size, 1)) ** 2
    return int(max(1, min(MAX_BATCH, scaled)))


def _batch_noise(
    names: Sequence[str], indices: Sequence[int], seed: int, n_draws: int, shape: Sequence[int], device
) -> tuple[torch.Tensor, list[list[int]]]:
    """Noise ``(M, n_draws, B, *shape)`` and the seeds ``[slice][member]`` of one batch."""
    seeds = [[slice_seed(seed, k, name) for name in names] for k in indices]
    per_member = [slice_noise([s[m] for s in seeds], n_draws, shape) for m in range(len(names))]
    return torch.stack(per_member).to(device), seeds


def _model_fn(model: nn.Module, device: torch.device, precision: str) -> Callable:
    """``model`` under the run's autocast (float32 on the CPU unless asked otherwise)."""

    def fn(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        with autocast(device, precision):
            return model(x, t, cond)

    return fn


def _denoise_batch(
    models: Sequence[nn.Module],
    cond: torch.Tensor,
    noise: torch.Tensor,
    settings: RestoreSettings,
    *,
    schedule: Schedule,
    conditioned: bool,
    t_start: int | None,
    device: torch.device,
) -> Iterator[tuple[int, int, list[torch.Tensor]]]:
    """Denoise one batch of slices with every member, in lockstep.

    ``cond`` is the batch of input slices ``(B, C, H, W)`` in ``[-1, 1]``: the condition of a
    conditioned ensemble, and the start image when ``t_start`` is set (partial noising, always
    so for the unconditioned baseline). ``noise`` is ``(M, n_draws, B, C, H, W)``. Yields
    ``(step, n_steps, xs)`` after each step, ``xs`` one ``(B, C, H, W)`` tensor per member in
    ``[-1, 1]``; after the last step they are the restorations. Stop iterating to cancel.
    """
    runs = [
        denoise_steps(
            _model_fn(model, device, settings.precision),
            cond if conditioned else None,
            schedule,
            sampler=settings.sampler,
            steps=settings.steps,
            noise=noise[m],
            t_start=t_start,
            x_start=cond if t_start is not None else None,
        )
        for m, model in enumerate(models)
    ]
    try:
        while True:
            xs = []
            for run in runs:
                step, n_steps, x = next(run)
                xs.append(x)
            yield step, n_steps, xs
            if step >= n_steps:
                return
    finally:
        for run in runs:
            run.close()
