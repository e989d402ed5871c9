"""Validation during training: :func:`validate` scores the EMA model on the held-out slices
corrupted with the fold's validation tasks, giving the validation loss (the training loss with
fixed timesteps and noise; early stopping follows its moving average), the pixel average
precision of quick-restoration anomaly maps against the synthetic masks, and the fidelity of
those restorations to the clean target (SSIM and PSNR outside and inside the anomaly).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import torch
from skimage.metrics import structural_similarity
from torch import nn

from pseudohealthy.data.dataset import ValidationSet
from pseudohealthy.device import autocast
from pseudohealthy.engine.defaults import FAITHFUL_SSIM
from pseudohealthy.engine.frame import FrameResult, restore_frame
from pseudohealthy.engine.maps import DATA_RANGE, SIGMA
from pseudohealthy.engine.sampler import SamplerPlan
from pseudohealthy.errors import NonFiniteError
from pseudohealthy.evaluation.metrics import binary_curve
from pseudohealthy.model.diffusion import Schedule, training_loss
from pseudohealthy.training.config import FIDELITY_FIELDS, TrainConfig
from pseudohealthy.training.distributed import unwrap

log = logging.getLogger(__name__)

__all__ = [
    "FIDELITY_FIELDS",
    "PSNR_CAP_DB",
    "VALIDATION_FAITHFUL_SSIM",
    "VALIDATION_MEMBER",
    "VALIDATION_SAMPLER",
    "format_fidelity",
    "region_fidelity",
    "restoration_fidelity",
    "validate",
]

VALIDATION_SAMPLER = "ddim"
"""The quick deterministic sampler of validation restorations (``config.val_ap_steps`` steps)."""

VALIDATION_MEMBER = "validation"
VALIDATION_FAITHFUL_SSIM = FAITHFUL_SSIM
"""The SSIM constants of validation maps (the library's default, so members' recorded thresholds
suit default restorations); recorded as ``validation.faithful_ssim`` in each member."""
"""The member name that keys the validation restorations' seeds (with the sample number)."""

PSNR_CAP_DB = 100.0
"""The PSNR of a region restored exactly (mean squared error at most 1e-10 on [0, 1] images), so
that a perfect restoration logs a finite number (JSON has no infinity)."""


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
    """``val_loss``, ``val_ap``, ``val_threshold`` and :data:`FIDELITY_FIELDS` of ``model`` on ``val``.

    ``val_loss``: the training loss with fixed t and noise. ``val_ap``: pixel AP of anomaly maps
    (the engine's :func:`~pseudohealthy.engine.frame.restore_frame` with DDIM of
    ``config.val_ap_steps`` steps, an unconditioned model from the inference depth
    :data:`~pseudohealthy.engine.sampler.BASELINE_T_START`) against the synthetic masks, on
    ``config.val_ap_samples`` evenly spaced slices; ``val_threshold``: the map threshold of the
    best Dice there. Both None when those slices hold no anomaly. The fidelity fields compare the
    same restorations with the clean target (:func:`restoration_fidelity`); all None when the
    restorations are not finite.
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
        x0 = schedule.to_model(_to_device(val.x0[sl], device))
        cond = schedule.to_model(_to_device(val.cond[sl], device)) if conditioned else None
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


def _restore_rows(
    model: nn.Module,
    val: ValidationSet,
    rows: np.ndarray,
    plan: SamplerPlan,
    schedule: Schedule,
    conditioned: bool,
    config: TrainConfig,
    device: torch.device,
    seed: int,
) -> FrameResult:
    """The engine's restoration of validation samples ``rows`` (the model as one member)."""
    return restore_frame(
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
        faithful_ssim=VALIDATION_FAITHFUL_SSIM,
    )


def _val_maps(
    model: nn.Module,
    val: ValidationSet,
    config: TrainConfig,
    schedule: Schedule,
    device: torch.device,
    seed: int,
) -> dict[str, float | None]:
    """AP and best-Dice threshold of the engine's maps on evenly spaced validation samples, and
    the fidelity of their restorations."""
    none: dict[str, float | None] = {"val_ap": None, "val_threshold": None}
    none.update(dict.fromkeys(FIDELITY_FIELDS))
    n_ap = min(config.val_ap_samples, len(val))
    if n_ap <= 0:
        return none
    pick = np.unique(np.linspace(0, len(val) - 1, n_ap).round().astype(int))
    conditioned = _conditioned(model)
    plan = SamplerPlan.for_ensemble(
        VALIDATION_SAMPLER, config.val_ap_steps, schedule, conditioned=conditioned
    )
    try:
        frames = [
            _restore_rows(model, val, pick[sl], plan, schedule, conditioned, config, device, seed)
            for sl in _batches(pick.size, max(1, 2 * config.batch_size))
        ]
    except NonFiniteError as exc:  # a diverged model: no AP to report, training decides what to do
        log.warning("validation restorations are not finite (%s): no val_ap this time", exc.problem)
        return none
    restored = np.concatenate([f.restorations[0] for f in frames])
    out = dict(none)
    out.update(restoration_fidelity(restored, val.x0[pick], val.fg[pick], val.mask[pick]))
    labels = val.mask[pick]
    if labels.any():
        curve = binary_curve(np.concatenate([f.maps for f in frames]).ravel(), labels.ravel())
        _, threshold = curve.best_dice()
        out.update(val_ap=curve.average_precision(), val_threshold=threshold)
    return out


def _ssim_maps(restorations: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM ``(N, S, S)`` of each restoration against its target (data range 1, the
    anomaly maps' Gaussian window; float64)."""
    return np.stack(
        [
            structural_similarity(
                r,
                t,
                gaussian_weights=True,
                sigma=SIGMA,
                use_sample_covariance=False,
                data_range=DATA_RANGE,
                full=True,
            )[1]
            for r, t in zip(restorations, targets, strict=True)
        ]
    )


def _psnr(restorations: np.ndarray, targets: np.ndarray) -> float:
    """PSNR in dB of ``restorations`` against ``targets`` (data range 1), capped at :data:`PSNR_CAP_DB`."""
    mse = float(np.mean((restorations - targets) ** 2))
    floor = DATA_RANGE**2 * 10 ** (-PSNR_CAP_DB / 10)
    return PSNR_CAP_DB if mse <= floor else float(10 * np.log10(DATA_RANGE**2 / mse))


def region_fidelity(
    restorations: np.ndarray, targets: np.ndarray, region: np.ndarray, *, ssim: np.ndarray | None = None
) -> tuple[float | None, float | None]:
    """``(SSIM, PSNR dB)`` of ``restorations`` against ``targets`` over the ``region`` pixels.

    All ``(N, S, S)`` (or ``(S, S)``), images in ``[0, 1]``. SSIM: the full SSIM map of each slice
    (skimage ``structural_similarity``, data range 1) averaged over the region's pixels of all
    slices; PSNR: from the mean squared error over those pixels. Pooled over the slices, as the
    benchmark's pixel metrics. ``ssim``: the SSIM maps when already computed. ``(None, None)``
    for an empty region.
    """
    rest = np.asarray(restorations, dtype=np.float64).reshape(-1, *np.shape(targets)[-2:])
    tgt = np.asarray(targets, dtype=np.float64).reshape(rest.shape)
    inside = np.asarray(region, dtype=bool).reshape(rest.shape)
    if not inside.any():
        return None, None
    maps = _ssim_maps(rest, tgt) if ssim is None else np.asarray(ssim).reshape(rest.shape)
    return float(maps[inside].mean()), _psnr(rest[inside], tgt[inside])


def restoration_fidelity(
    restorations: np.ndarray, targets: np.ndarray, foreground: np.ndarray, anomaly: np.ndarray
) -> dict[str, float | None]:
    """:data:`FIDELITY_FIELDS`: :func:`region_fidelity` outside the anomaly (foreground minus
    ``anomaly``) and inside it (``anomaly``), of ``(N, S, S)`` restorations in ``[0, 1]``
    against the clean ``targets``; None for an empty region."""
    rest = np.asarray(restorations, dtype=np.float64)
    tgt = np.asarray(targets, dtype=np.float64)
    anomaly = np.asarray(anomaly, dtype=bool)
    ssim = _ssim_maps(rest, tgt)
    out_region = np.asarray(foreground, dtype=bool) & ~anomaly
    ssim_out, psnr_out = region_fidelity(rest, tgt, out_region, ssim=ssim)
    ssim_in, psnr_in = region_fidelity(rest, tgt, anomaly, ssim=ssim)
    return dict(zip(FIDELITY_FIELDS, (ssim_out, psnr_out, ssim_in, psnr_in), strict=True))


def format_fidelity(scores: dict[str, float | None]) -> str:
    """``", SSIM out/in 0.912/0.701, PSNR out/in 31.2/18.4 dB"`` for the progress line ("" if none)."""

    def pair(out: float | None, inside: float | None, fmt: str) -> str:
        return "/".join("-" if v is None else format(v, fmt) for v in (out, inside))

    ssim_out, psnr_out, ssim_in, psnr_in = (scores.get(k) for k in FIDELITY_FIELDS)
    if ssim_out is None and ssim_in is None:
        return ""
    return f", SSIM out/in {pair(ssim_out, ssim_in, '.3f')}, PSNR out/in {pair(psnr_out, psnr_in, '.1f')} dB"
