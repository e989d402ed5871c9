"""The model-frame engine: slices in, restorations and anomaly maps out, every member in lockstep.

:func:`restore_frame_steps` (and its fold :func:`restore_frame`) is the one place where networks
restore model-frame slices: the scan-level engine (:mod:`pseudohealthy.engine.restore`),
training validation and the benchmarks all call it. Slice ``k`` of member ``m`` draws its noise
from its own generator seeded by :func:`~pseudohealthy.engine.sampler.slice_seed` ``(seed, k,
m)``, so its result does not depend on the batch, the order or the other members. Nothing here
touches scans or files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pseudohealthy.device import autocast
from pseudohealthy.engine.defaults import FAITHFUL_SSIM
from pseudohealthy.engine.maps import anomaly_map, ensemble_map, member_disagreement, slice_scores
from pseudohealthy.engine.sampler import SamplerPlan, denoise, slice_noise, slice_seed
from pseudohealthy.errors import NonFiniteError
from pseudohealthy.model.diffusion import Schedule

__all__ = [
    "FrameResult",
    "batch_noise",
    "check_finite",
    "compiled",
    "default_batch_size",
    "restore_frame",
    "restore_frame_steps",
]

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


def default_batch_size(device: torch.device, image_size: int) -> int:
    """Slices per batch when the settings leave it open (a CUDA out-of-memory halves it)."""
    if device.type != "cuda":
        return CPU_BATCH
    scaled = CUDA_BATCH_128 * (128 / max(image_size, 1)) ** 2
    return int(max(1, min(MAX_BATCH, scaled)))


def batch_noise(
    names: Sequence[str],
    indices: Sequence[int],
    seed: int,
    n_draws: int,
    shape: Sequence[int],
    device: torch.device | str,
) -> tuple[torch.Tensor, list[list[int]]]:
    """Noise ``(M, n_draws, B, *shape)`` and the seeds ``[slice][member]`` of one batch."""
    seeds = [[slice_seed(seed, k, name) for name in names] for k in indices]
    per_member = [slice_noise([s[m] for s in seeds], n_draws, shape) for m in range(len(names))]
    return torch.stack(per_member).to(device), seeds


@dataclass
class FrameResult:
    """One batch restored by every member, in the model frame ``(S, S)``.

    ``restorations`` ``(M, B, S, S)`` in ``[0, 1]``; ``member_maps`` ``(M, B, S, S)`` 1 - SSIM
    maps; ``maps`` ``(B, S, S)`` their ensemble mean (0 outside the foreground); ``scores``
    ``(B,)`` and ``member_scores`` ``(B, M)`` the slice scores; ``seeds`` ``[slice][member]``;
    ``uncertainty`` ``(B, S, S)`` the members' disagreement (per-pixel standard deviation of their
    maps) and ``uncertainty_scores`` ``(B,)`` its slice means.
    """

    restorations: np.ndarray
    member_maps: np.ndarray
    maps: np.ndarray
    scores: np.ndarray
    member_scores: np.ndarray
    seeds: list[list[int]]
    uncertainty: np.ndarray
    uncertainty_scores: np.ndarray


def _model_fn(model: nn.Module, device: torch.device, precision: str) -> Callable:
    """``model`` under the run's autocast (float32 on the CPU unless asked otherwise)."""

    def fn(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        with autocast(device, precision):
            return model(x, t, cond)

    return fn


def restore_frame_steps(
    models: Sequence[nn.Module],
    names: Sequence[str],
    images: np.ndarray,
    masks: np.ndarray,
    indices: Sequence[int],
    plan: SamplerPlan,
    schedule: Schedule,
    *,
    seed: int,
    conditioned: bool,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    faithful_ssim: bool = FAITHFUL_SSIM,
) -> Iterator[int | FrameResult]:
    """Restore model-frame slices with every member in lockstep.

    ``images`` ``(B, S, S)`` in ``[0, 1]`` are the condition of a conditioned ensemble and the
    start image of a plan with ``t_start``; ``masks`` ``(B, S, S)`` their foreground; ``indices``
    the slices' keys for the seeds (canonical axial indices, or sample numbers). Yields the step
    number (1..``plan.n_steps``) after each step of all members, then one :class:`FrameResult`.
    Stop iterating to cancel. A member whose restorations hold NaN or infinite values raises
    :class:`~pseudohealthy.errors.NonFiniteError` naming it (no NaN maps are returned).
    """
    device = torch.device(device)
    images = np.asarray(images, dtype=np.float32)
    noise, seeds = batch_noise(names, indices, seed, plan.n_draws, (1, *images.shape[1:]), device)
    x01 = torch.from_numpy(np.ascontiguousarray(images)[:, None]).to(device)
    cond = schedule.to_model(x01)
    x_start = cond if plan.t_start is not None else None
    model_cond = cond if conditioned else None
    runs = [
        denoise(_model_fn(model, device, precision), model_cond, plan, schedule, noise[m], x_start)
        for m, model in enumerate(models)
    ]
    xs: list[torch.Tensor] = []
    try:
        for step in range(1, plan.n_steps + 1):
            xs = [next(run)[1] for run in runs]
            yield step
    finally:
        for run in runs:
            run.close()
    check_finite(xs, names)
    yield _frame_result([schedule.from_model(x.float()) for x in xs], images, masks, seeds, faithful_ssim)


def check_finite(xs: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """Raise :class:`NonFiniteError` naming the members whose final ``x`` is not all finite."""
    bad = [name for name, x in zip(names, xs, strict=True) if not bool(torch.isfinite(x).all())]
    if bad:
        raise NonFiniteError(
            f"member{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}",
            "the network output NaN or infinite values (broken weights, or a reduced precision "
            "overflowing: try precision fp32)",
        )


def _frame_result(
    xs: list[torch.Tensor], images: np.ndarray, masks: np.ndarray, seeds: list[list[int]], faithful: bool
) -> FrameResult:
    rest = np.stack([x[:, 0].cpu().numpy() for x in xs])  # (M, B, S, S) in [0, 1]
    masks = np.asarray(masks, dtype=bool)
    member_maps = np.stack([anomaly_map(r, images, masks, faithful=faithful) for r in rest])
    maps = ensemble_map(member_maps, masks)
    member_scores = np.stack([slice_scores(m) for m in member_maps], axis=1)
    spread = member_disagreement(member_maps, masks)
    return FrameResult(
        rest, member_maps, maps, slice_scores(maps), member_scores, seeds, spread, slice_scores(spread)
    )


def restore_frame(*args, **kwargs) -> FrameResult:
    """:func:`restore_frame_steps` run to the end: the :class:`FrameResult` (same arguments)."""
    for item in restore_frame_steps(*args, **kwargs):
        if isinstance(item, FrameResult):
            return item
    raise AssertionError("restore_frame_steps ended without a result")
