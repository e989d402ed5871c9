"""Validation during training: :func:`validate` scores the EMA model on the held-out slices
corrupted with the fold's validation tasks, giving the validation loss (the training loss with
fixed timesteps and noise; early stopping follows its moving average) and the pixel average
precision of quick-restoration anomaly maps against the synthetic masks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from pseudohealthy.data.dataset import ValidationSet
from pseudohealthy.device import autocast
from pseudohealthy.engine.frame import restore_frame
from pseudohealthy.engine.sampler import SamplerPlan
from pseudohealthy.errors import NonFiniteError
from pseudohealthy.evaluation.metrics import binary_curve
from pseudohealthy.model.diffusion import Schedule, to_model_range, training_loss
from pseudohealthy.training.config import TrainConfig
from pseudohealthy.training.distributed import unwrap

log = logging.getLogger(__name__)

__all__ = ["VALIDATION_MEMBER", "VALIDATION_SAMPLER", "validate"]

VALIDATION_SAMPLER = "ddim"
"""The quick deterministic sampler of validation restorations (``config.val_ap_steps`` steps)."""

VALIDATION_MEMBER = "validation"
"""The member name that keys the validation restorations' seeds (with the sample number)."""


def _batches(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[:, None].to(device)


@torch.no_grad()
def validate(
    model: nn.Module,
    val: ValidationSet,
    config: TrainConfig,
    *,
    schedule: Schedule | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float | None]:
    """``val_loss``, ``val_ap`` and ``val_threshold`` of ``model`` on ``val``.

    ``val_loss``: the training loss with fixed t and noise. ``val_ap``: pixel AP of anomaly maps
    (the engine's :func:`~pseudohealthy.engine.frame.restore_frame` with DDIM of
    ``config.val_ap_steps`` steps, an unconditioned model from the inference depth
    :data:`~pseudohealthy.engine.sampler.BASELINE_T_START`) against the synthetic masks, on
    ``config.val_ap_samples`` evenly spaced slices; ``val_threshold``: the map threshold of the
    best Dice there. Both None when those slices hold no anomaly.
    """
    device = torch.device(device)
    schedule = schedule or Schedule()
    was_training = model.training
    model.eval()
    try:
        out: dict[str, float | None] = {"val_loss": _val_loss(model, val, config, schedule, device, seed)}
        out.update(_val_maps(model, val, config, schedule, device, seed))
    finally:
        model.train(was_training)
    return out


def _conditioned(model: nn.Module) -> bool:
    return bool(getattr(unwrap(model), "conditioned", True))


def _val_loss(
    model: nn.Module,
    val: ValidationSet,
    config: TrainConfig,
    schedule: Schedule,
    device: torch.device,
    seed: int,
) -> float:
    """The training loss on every validation sample, with noise and t from a generator of ``seed``."""
    conditioned = _conditioned(model)
    gen = torch.Generator().manual_seed(int(seed))
    total, count = 0.0, 0
    for sl in _batches(len(val), max(1, 2 * config.batch_size)):
        x0 = to_model_range(_to_device(val.x0[sl], device))
        cond = to_model_range(_to_device(val.cond[sl], device)) if conditioned else None
        with autocast(device, config.precision):
            _, per = training_loss(
                model,
                x0,
                cond,
                schedule,
                generator=gen,
                noise_offset=config.noise_offset,
                min_snr_gamma=config.min_snr_gamma,
                return_per_sample=True,
            )
        total += float(per.double().sum())
        count += int(per.numel())
    return total / max(count, 1)


def _frame_maps(
    model: nn.Module,
    val: ValidationSet,
    rows: np.ndarray,
    plan: SamplerPlan,
    schedule: Schedule,
    conditioned: bool,
    config: TrainConfig,
    device: torch.device,
    seed: int,
) -> np.ndarray:
    """The engine's ensemble maps of validation samples ``rows`` (the model as one member)."""
    frame = restore_frame(
        [model],
        [VALIDATION_MEMBER],
        val.cond[rows],
        val.fg[rows],
        [int(i) for i in rows],
        plan,
        schedule,
        seed=seed,
        conditioned=conditioned,
        device=device,
        precision=config.precision,
    )
    return frame.maps


def _val_maps(
    model: nn.Module,
    val: ValidationSet,
    config: TrainConfig,
    schedule: Schedule,
    device: torch.device,
    seed: int,
) -> dict[str, float | None]:
    """AP and best-Dice threshold of the engine's maps on evenly spaced validation samples."""
    none: dict[str, float | None] = {"val_ap": None, "val_threshold": None}
    n_ap = min(config.val_ap_samples, len(val))
    if n_ap <= 0:
        return none
    pick = np.unique(np.linspace(0, len(val) - 1, n_ap).round().astype(int))
    labels = val.mask[pick]
    if not labels.any():
        return none
    conditioned = _conditioned(model)
    plan = SamplerPlan.for_ensemble(
        VALIDATION_SAMPLER, config.val_ap_steps, schedule, conditioned=conditioned
    )
    try:
        maps = [
            _frame_maps(model, val, pick[sl], plan, schedule, conditioned, config, device, seed)
            for sl in _batches(pick.size, max(1, 2 * config.batch_size))
        ]
    except NonFiniteError as exc:  # a diverged model: no AP to report, training decides what to do
        log.warning("validation restorations are not finite (%s): no val_ap this time", exc.problem)
        return none
    curve = binary_curve(np.concatenate(maps).ravel(), labels.ravel())
    _, threshold = curve.best_dice()
    return {"val_ap": curve.average_precision(), "val_threshold": threshold}
