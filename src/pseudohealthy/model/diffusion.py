"""Diffusion maths: the noise schedule (:class:`Schedule`), the training objective
(:func:`training_loss`) and the model range.

A :class:`Schedule` holds everything the weights depend on beyond the architecture: the betas,
what the network predicts (``prediction``: "epsilon" the noise, "v" the velocity
``sqrt(abar) eps - sqrt(1 - abar) x0``, "sample" the clean image), whether the betas are rescaled
to a zero terminal SNR (``zero_snr``, Lin et al. 2024) and the model range (``centred``: images in
``[-1, 1]``; otherwise ``[0, 1]`` as the reference's MRI models). :meth:`Schedule.to_model` /
:meth:`Schedule.from_model` map ``[0, 1]`` images in and out; :meth:`Schedule.x0_from` /
:meth:`Schedule.eps_from` turn a network output into the clean image and the noise. The
samplers that run a schedule backwards live in :mod:`pseudohealthy.engine.sampler`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pseudohealthy.model.network import ConfigError

__all__ = [
    "LEGACY_SCHEDULE",
    "MAX_T",
    "PREDICTIONS",
    "SCHEDULE_KINDS",
    "Schedule",
    "min_snr_weight",
    "training_loss",
]

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("epsilon", "v", "sample")
"""What a network predicts: the noise, the velocity ``sqrt(abar) eps - sqrt(1 - abar) x0``, or x0."""
MAX_T = 10_000  # diffusion steps; the reference uses 1000 (a checkpoint's T is checked before use)
LEGACY_SCHEDULE = {"prediction": "epsilon", "zero_snr": False, "centred": True}
"""The values of the fields a checkpoint written before they existed lacks (our first models
predicted epsilon in ``[-1, 1]`` on the plain betas)."""
X0_CLIP = 1.0  # predicted x0 is clipped to [-1, 1] (the reference clips there even for [0, 1] data)

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def _base_betas(T: int, beta_start: float, beta_end: float, kind: str) -> torch.Tensor:
    """The float64 betas of ``kind`` before any rescaling."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    s = torch.linspace(0, T, T + 1, dtype=torch.float64) / T  # cosine (Nichol & Dhariwal 2021)
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def _zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """``alpha_bar`` rescaled so that its last value is 0 and its first unchanged (Lin et al.
    2024, Algorithm 1: shift ``sqrt(abar)`` by its last value, scale back to its first)."""
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    if not first > last:
        raise ConfigError("zero_snr needs a schedule whose alpha_bar decreases", "zero_snr")
    return ((root - last) * (first / (first - last))) ** 2


def _check_flags(prediction: Any, zero_snr: Any, centred: Any) -> None:
    if not isinstance(prediction, str) or prediction not in PREDICTIONS:
        raise ConfigError(
            f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}", "prediction"
        )
    for name, value in (("zero_snr", zero_snr), ("centred", centred)):
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", name)
    if zero_snr and prediction == "epsilon":
        raise ConfigError("zero_snr needs prediction 'v' or 'sample'", "zero_snr")


def _check_betas(T: Any, beta_start: Any, beta_end: Any, kind: Any) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_T:
        raise ConfigError(f"must be an integer in 1..{MAX_T}, got {T!r}", "T")
    if not isinstance(kind, str) or kind not in SCHEDULE_KINDS:
        raise ConfigError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}", "kind")
    for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
        if isinstance(value, bool) or not isinstance(value, float | int) or not 0 < value < 1:
            raise ConfigError(f"must be a number in (0, 1), got {value!r}", name)
    if beta_start > beta_end:
        raise ConfigError(f"must not exceed beta_end ({beta_end!r}), got {beta_start!r}", "beta_start")


def _view(coef: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor | float:
    """A per-sample coefficient ``(B,)`` shaped to broadcast over ``like``; scalars unchanged."""
    if not isinstance(coef, torch.Tensor):
        return coef
    coef = coef.to(like.dtype)
    return coef.view(-1, *([1] * (like.ndim - 1))) if coef.ndim else coef


class Schedule:
    """The forward process: ``T`` betas (``kind`` "linear" = linear in beta, as the reference),
    the network's ``prediction``, the zero-terminal-SNR rescale and the model range.

    ``betas``, ``alphas`` and ``alphas_cumprod`` are float32 tensors computed in float64;
    ``abar(t)`` gives the float64 value of one step as a Python float. The settings are checked
    (``T`` in 1..``MAX_T``, ``0 < beta_start <= beta_end < 1``, ``prediction`` in
    :data:`PREDICTIONS`, ``zero_snr`` only with "v" or "sample": epsilon cannot give x0 where the
    signal is gone) before anything is computed.
    """

    def __init__(
        self,
        T: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        kind: str = "linear",
        *,
        prediction: str = "epsilon",
        zero_snr: bool = False,
        centred: bool = False,
    ):
        _check_betas(T, beta_start, beta_end, kind)
        _check_flags(prediction, zero_snr, centred)
        self.T, self.beta_start, self.beta_end, self.kind = T, float(beta_start), float(beta_end), kind
        self.prediction, self.zero_snr, self.centred = prediction, zero_snr, centred
        betas = _base_betas(T, beta_start, beta_end, kind)
        abar = torch.cumprod(1.0 - betas, 0)
        if zero_snr:
            abar = _zero_terminal_snr(abar)
            betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
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
        """Signal-to-noise ratio ``abar / (1 - abar)`` at ``t`` (0 at a zero-SNR terminal step)."""
        t = torch.as_tensor(t)
        abar = self.alphas_cumprod_on(t.device)[t]
        return abar / (1.0 - abar)

    def _coefs(self, t: torch.Tensor | int, like: torch.Tensor) -> tuple[Any, Any]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))``: float64 scalars for an int ``t``, else per sample."""
        if isinstance(t, int):
            a = self.abar(t)
            return math.sqrt(a), math.sqrt(1.0 - a)
        abar = self.alphas_cumprod_on(like.device)[torch.as_tensor(t, device=like.device)]
        return _view(abar.sqrt(), like), _view((1.0 - abar).sqrt(), like)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (``t`` scalar or per sample)."""
        a, s = self._coefs(torch.as_tensor(t), x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """What the network should output for ``x_t = q_sample(x0, t, noise)``."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        a, s = self._coefs(t, x0)
        return a * noise - s * x0

    def x0_from(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The clean image the network's ``output`` at ``(x_t, t)`` implies (not clipped)."""
        if self.prediction == "sample":
            return output
        a, s = self._coefs(t, x_t)
        if self.prediction == "v":
            return a * x_t - s * output
        return (x_t - s * output) / a

    def eps_from(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """The noise the network's ``output`` at ``(x_t, t)`` implies (from the unclipped x0)."""
        if self.prediction == "epsilon":
            return output
        a, s = self._coefs(t, x_t)
        if self.prediction == "v":
            return s * x_t + a * output
        return (x_t - a * output) / s

    def clip_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """A predicted x0 clipped to ``[-1, 1]`` (as the reference, whatever the model range)."""
        return x0.clamp(-X0_CLIP, X0_CLIP)

    def to_model(self, x01: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` images -> the model range (``[-1, 1]`` if ``centred``, else unchanged)."""
        return x01 * 2.0 - 1.0 if self.centred else x01

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """The model range -> ``[0, 1]`` images, clamped."""
        return ((x + 1.0) * 0.5 if self.centred else x).clamp(0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "T": self.T,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "kind": self.kind,
            "prediction": self.prediction,
            "zero_snr": self.zero_snr,
            "centred": self.centred,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`; unknown fields or missing betas raise :class:`ConfigError`.

        A missing ``prediction``, ``zero_snr`` or ``centred`` takes its :data:`LEGACY_SCHEDULE`
        value (checkpoints written before those fields existed).
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"expected a mapping, got {type(data).__name__}")
        required = ("T", "beta_start", "beta_end", "kind")
        unknown = sorted(set(data) - set(required) - set(LEGACY_SCHEDULE))
        if unknown:
            raise ConfigError("unknown field", unknown[0])
        for name in required:
            if name not in data:
                raise ConfigError("missing field", name)
        return cls(**{**LEGACY_SCHEDULE, **dict(data)})


def min_snr_weight(snr: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    """The Min-SNR-gamma loss weight of each sample for a network predicting ``prediction``
    (Hang et al. 2023): ``min(snr, g) / snr`` for epsilon, ``min(snr, g) / (snr + 1)`` for v,
    ``min(snr, g)`` for x0. Finite at ``snr = 0`` (a zero-SNR terminal step): 0 for v and x0;
    for epsilon (its limit there) 1."""
    clipped = snr.clamp(max=gamma)
    if prediction == "v":
        return clipped / (snr + 1.0)
    if prediction == "sample":
        return clipped
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


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
    """Min-SNR-weighted MSE to the schedule's prediction target, with offset noise (the
    reference's training objective for epsilon prediction).

    ``x0`` and ``cond`` are (B, C, H, W) in the model range (:meth:`Schedule.to_model`;
    ``cond=None`` for an unconditioned model). ``t`` is drawn uniformly from ``0..T-1`` unless
    given. The noise is ``N(0, I)`` plus ``noise_offset * N(0, 1)`` per sample and channel,
    broadcast over the image; the target is :meth:`Schedule.target` of that noise. Each sample's
    MSE is weighted by :func:`min_snr_weight` (no weighting if ``min_snr_gamma`` is None or 0).
    Random draws use ``generator`` (on its own device) and move to ``x0.device``. Returns the
    mean loss, or ``(mean, per_sample)`` when ``return_per_sample``.
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
    x_t = schedule.q_sample(x0, t, noise)
    pred = model(x_t, t, cond)
    target = schedule.target(x0, noise, t)
    per_sample = (pred.float() - target).square().mean(dim=tuple(range(1, x0.ndim)))
    if min_snr_gamma:
        per_sample = per_sample * min_snr_weight(schedule.snr(t), schedule.prediction, min_snr_gamma)
    loss = per_sample.mean()
    return (loss, per_sample) if return_per_sample else loss
