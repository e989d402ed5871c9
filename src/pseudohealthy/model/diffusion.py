"""Diffusion maths: the noise schedule (:class:`Schedule`), the training objective
(:func:`training_loss`) and the model range ``[-1, 1]`` (:func:`to_model_range` maps ``[0, 1]``
in). The network predicts the noise ``eps`` (epsilon prediction). The samplers that run a
schedule backwards live in :mod:`pseudohealthy.engine.sampler`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pseudohealthy.model.network import ConfigError

__all__ = ["MAX_T", "SCHEDULE_KINDS", "Schedule", "from_model_range", "to_model_range", "training_loss"]

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
MAX_T = 10_000  # diffusion steps; the reference uses 1000 (a checkpoint's T is checked before use)

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` -> ``[-1, 1]``."""
    return x01 * 2.0 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` -> ``[0, 1]`` (clamped)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


class Schedule:
    """The forward process: ``T`` betas (``kind`` "linear" = linear in beta, as the reference).

    ``betas``, ``alphas`` and ``alphas_cumprod`` are float32 tensors computed in float64;
    ``abar(t)`` gives the float64 value of one step as a Python float. The settings are checked
    (``T`` in 1..``MAX_T``, ``0 < beta_start <= beta_end < 1``) before anything is computed.
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, kind: str = "linear"):
        if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
            raise ConfigError(f"must be an integer in 1..{MAX_T}, got {T!r}", "T")
        if not isinstance(kind, str) or kind not in SCHEDULE_KINDS:
            raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}", "kind")
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, float | int) or not 0 < value < 1:
                raise ConfigError(f"must be a number in (0, 1), got {value!r}", name)
        if beta_start > beta_end:
            raise ConfigError(f"must not exceed beta_end ({beta_end!r}), got {beta_start!r}", "beta_start")
        self.T, self.beta_start, self.beta_end, self.kind = T, float(beta_start), float(beta_end), kind
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        else:  # cosine (Nichol & Dhariwal 2021)
            s = torch.linspace(0, T, T + 1, dtype=torch.float64) / T
            f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        abar = torch.cumprod(1.0 - betas, 0)
        self._abar64: list[float] = abar.tolist()
        self.betas = betas.float()
        self.alphas = (1.0 - betas).float()
        self.alphas_cumprod = abar.float()
        self._cache: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"Schedule({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def abar_list(self) -> list[float]:
        """``alpha_bar_t`` for every ``t`` in float64 (a copy)."""
        return list(self._abar64)

    def abar(self, t: int) -> float:
        """``alpha_bar_t`` in float64; ``t < 0`` means the clean image (1.0)."""
        return 1.0 if t < 0 else self._abar64[t]

    def alphas_cumprod_on(self, device: torch.device | str) -> torch.Tensor:
        """``alphas_cumprod`` on ``device`` (cached, so a training loop copies it once)."""
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = self.alphas_cumprod.to(device)
        return self._cache[device]

    def snr(self, t: torch.Tensor | int) -> torch.Tensor:
        """Signal-to-noise ratio ``abar / (1 - abar)`` at ``t``."""
        t = torch.as_tensor(t)
        abar = self.alphas_cumprod_on(t.device)[t]
        return abar / (1.0 - abar)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (``t`` scalar or per sample)."""
        t = torch.as_tensor(t, device=x0.device)
        abar = self.alphas_cumprod_on(x0.device)[t].to(x0.dtype)
        if abar.ndim:
            abar = abar.view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def to_dict(self) -> dict[str, Any]:
        return {"T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`; unknown or missing fields raise :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}")
        names = ("T", "beta_start", "beta_end", "kind")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError("unknown field", unknown[0])
        for name in names:
            if name not in data:
                raise ConfigError("missing field", name)
        return cls(**dict(data))


def training_loss(
    model: nn.Module | ModelFn,
    x0: torch.Tensor,
    cond: torch.Tensor | None,
    schedule: Schedule,
    *,
    generator: torch.Generator | None = None,
    noise_offset: float = 0.1,
    min_snr_gamma: float | None = 1.0,
    t: torch.Tensor | None = None,
    return_per_sample: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Min-SNR-weighted epsilon MSE with offset noise (the reference's training objective).

    ``x0`` and ``cond`` are (B, C, H, W) in ``[-1, 1]`` (``cond=None`` for an unconditioned model).
    ``t`` is drawn uniformly from ``0..T-1`` unless given. The noise is ``N(0, I)`` plus
    ``noise_offset * N(0, 1)`` per sample and channel, broadcast over the image. Each sample's
    MSE is weighted by ``min(SNR_t, gamma) / SNR_t`` (no weighting if ``min_snr_gamma`` is None
    or 0). Random draws use ``generator`` (on its own device) and move to ``x0.device``.
    Returns the mean loss, or ``(mean, per_sample)`` when ``return_per_sample``.
    """
    b, c = x0.shape[:2]
    device = x0.device
    gdev = generator.device if generator is not None else device
    x0 = x0.float()
    if t is None:
        t = torch.randint(0, schedule.T, (b,), generator=generator, device=gdev)
    t = torch.as_tensor(t).to(device=device, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=generator, device=gdev).to(device)
    if noise_offset:
        offset = torch.randn((b, c, 1, 1), generator=generator, device=gdev).to(device)
        noise = noise + noise_offset * offset
    abar = schedule.alphas_cumprod_on(device)[t].view(b, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise
    pred = model(x_t, t, cond)
    per_sample = (pred.float() - noise).square().mean(dim=tuple(range(1, x0.ndim)))
    if min_snr_gamma:
        snr = (abar / (1.0 - abar)).view(b)
        per_sample = per_sample * snr.clamp(max=min_snr_gamma) / snr
    loss = per_sample.mean()
    return (loss, per_sample) if return_per_sample else loss
