"""Diffusion maths: the noise schedule, the training loss and the samplers.

Images are in the model range ``[-1, 1]`` here (:func:`to_model_range` maps ``[0, 1]`` in).
The network predicts the noise ``eps`` (epsilon prediction). All samplers clip the predicted
``x0`` to ``[-1, 1]`` and take every step with scalar coefficients computed in float64 on the
host, so the loop never copies between host and device.

Samplers (:func:`denoise_steps`):

- ``"ddpm"``: ancestral sampling (the reference's default, 50 steps at t = 980, 960, ..., 0),
  each step drawing from the exact posterior ``q(x_s | x_t, x0)`` between consecutive
  timesteps ``t > s`` (fixed-small variance).
- ``"ddim"``: deterministic DDIM (eta = 0).
- ``"dpm"``: DPM-Solver++(2M) (Lu et al. 2022), deterministic second-order multistep solver in
  x0-prediction, on timesteps evenly spaced in log-SNR; 10-20 steps.

Per-slice reproducibility: every random draw of a sampler comes from ``noise``, a tensor of
pre-drawn Gaussian noise ``(n_draws, B, C, H, W)``; :func:`slice_noise` draws each slice's
noise from its own seeded generator, so a slice's result does not depend on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pseudohealthy.model.network import ConfigError

__all__ = [
    "SAMPLERS",
    "Schedule",
    "denoise_steps",
    "from_model_range",
    "n_noise_draws",
    "sampler_timesteps",
    "slice_noise",
    "to_model_range",
    "training_loss",
]

SAMPLERS = ("ddpm", "ddim", "dpm")
SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")

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
    ``abar(t)`` gives the float64 value of one step as a Python float.
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, kind: str = "linear"):
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ConfigError(f"must be a positive integer, got {T!r}", "T")
        if kind not in SCHEDULE_KINDS:
            raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}", "kind")
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, float | int) or not 0 < value < 1:
                raise ConfigError(f"must be a number in (0, 1), got {value!r}", name)
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

    def to(self, device: torch.device | str) -> Schedule:
        """Move the tensors to ``device`` (in place; returns self)."""
        self.betas = self.betas.to(device)
        self.alphas = self.alphas.to(device)
        self.alphas_cumprod = self.alphas_cumprod_on(device)
        return self

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


def sampler_timesteps(sampler: str, steps: int, T: int = 1000, schedule: Schedule | None = None) -> list[int]:
    """Descending timesteps a sampler visits (one network call each).

    ``ddpm`` / ``ddim``: evenly spaced from 0 with stride ``T // steps`` (50 steps: 980, 960,
    ..., 0, as the reference). ``dpm``: from ``T-1`` to 0 evenly spaced in log-SNR (of
    ``schedule``, default the linear one), which suits a few-step solver far better than even
    spacing in t (see ``tests/test_diffusion.py``); distinct integers, always ending at 0.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T}, got {steps!r}")
    if sampler != "dpm":
        stride = T // steps
        return [k * stride for k in reversed(range(steps))]
    if steps == 1:
        return [T - 1]
    schedule = schedule if schedule is not None and schedule.T == T else Schedule(T)
    lam = torch.tensor([0.5 * math.log(a / (1.0 - a)) for a in schedule._abar64], dtype=torch.float64)
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # nearest t per target
    ts = [min(max(t, steps - 1 - k), T - 1 - k) for k, t in enumerate(ts)]
    ts[-1] = 0
    for k in range(steps - 2, -1, -1):  # distinct: where log-SNR moves fast, take neighbours
        ts[k] = max(ts[k], ts[k + 1] + 1)
    return ts


def n_noise_draws(steps: int) -> int:
    """Noise draws a sampler may use for ``steps`` steps: the start plus one per step."""
    return steps + 1


def slice_noise(
    seeds: Sequence[int],
    n_draws: int,
    shape: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian noise ``(n_draws, B, *shape)``; slice ``i`` from ``torch.Generator().manual_seed(seeds[i])``.

    Drawn on the CPU (so it is identical on every device) and moved to ``device`` once.
    """
    per_slice = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        per_slice.append(torch.randn((n_draws, *shape), generator=gen, dtype=dtype))
    noise = torch.stack(per_slice, dim=1)
    return noise if device is None else noise.to(device)


def _timesteps_from(sampler: str, steps: int, schedule: Schedule, t_start: int | None) -> list[int]:
    T = schedule.T
    ts = sampler_timesteps(sampler, steps, T, schedule)
    if t_start is None:
        return ts
    if isinstance(t_start, bool) or not isinstance(t_start, int) or not 0 <= t_start < T:
        raise ValueError(f"t_start must be an integer in 0..{T - 1}, got {t_start!r}")
    return [t_start] + [t for t in ts if t < t_start]


def denoise_steps(
    model_fn: nn.Module | ModelFn,
    cond: torch.Tensor | None,
    schedule: Schedule,
    *,
    sampler: str = "ddpm",
    steps: int = 50,
    noise: torch.Tensor,
    t_start: int | None = None,
    x_start: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Run a sampler, yielding ``(step, n_steps, x)`` after every step (``step`` counts from 1).

    ``model_fn(x_t, t, cond) -> eps`` with ``t`` a (B,) long tensor. ``noise`` is
    ``(n_draws, B, C, H, W)``: draw 0 is the starting noise, draw ``k`` the noise of step ``k``
    (``ddpm`` only). After the last step ``x`` is the sample in ``[-1, 1]``. Stop iterating to
    cancel. Partial noising (the unconditioned baseline): pass ``x_start`` (alias ``start``, the
    image in ``[-1, 1]``) and ``t_start``; ``x_start`` is noised to ``t_start`` with draw 0 and
    denoised from there through the sampler's timesteps below ``t_start``.
    """
    if x_start is None:
        x_start = start
    if (x_start is None) != (t_start is None):
        raise ValueError("partial noising needs both x_start and t_start")
    ts = _timesteps_from(sampler, steps, schedule, t_start)
    n_steps = len(ts)
    needed = n_steps if sampler == "ddpm" else 1
    if noise.ndim < 2 or noise.shape[0] < needed:
        raise ValueError(f"noise must be (n_draws >= {needed}, B, C, H, W), got {tuple(noise.shape)}")
    x = noise[0].float()
    if x_start is not None:
        a = schedule.abar(ts[0])
        x = math.sqrt(a) * x_start.float() + math.sqrt(1.0 - a) * x
    b, device = x.shape[0], x.device
    prev_x0: torch.Tensor | None = None
    prev_h = 0.0
    for i, t in enumerate(ts):
        with torch.no_grad():  # not across the yield: grad mode must not leak to the caller
            s = ts[i + 1] if i + 1 < n_steps else -1
            a_t, a_s = schedule.abar(t), schedule.abar(s)
            t_vec = torch.full((b,), t, dtype=torch.long, device=device)
            eps = model_fn(x, t_vec, cond).float()
            x0 = ((x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)).clamp(-1.0, 1.0)
            if s < 0:
                x = x0  # every sampler's last step lands on the (clipped) x0 prediction
            elif sampler == "ddpm":
                beta = 1.0 - a_t / a_s
                mean = (math.sqrt(a_s) * beta / (1.0 - a_t)) * x0 + (
                    math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
                ) * x
                var = max((1.0 - a_s) / (1.0 - a_t) * beta, 1e-20)
                x = mean + math.sqrt(var) * noise[i + 1].float()
            elif sampler == "ddim":
                x = math.sqrt(a_s) * x0 + math.sqrt(1.0 - a_s) * eps
            else:  # dpm: DPM-Solver++(2M)
                lam_t = 0.5 * math.log(a_t / (1.0 - a_t))
                lam_s = 0.5 * math.log(a_s / (1.0 - a_s))
                h = lam_s - lam_t
                d = x0
                if prev_x0 is not None:
                    r = prev_h / h
                    d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev_x0
                x = math.sqrt((1.0 - a_s) / (1.0 - a_t)) * x - math.sqrt(a_s) * math.expm1(-h) * d
                prev_x0, prev_h = x0, h
        yield i + 1, n_steps, x
