"""The samplers and their one plan: which timesteps, how many noise draws, where partial noising starts.

Every rule of sampling has its home here (the names and defaults the faces offer are in
:mod:`pseudohealthy.engine.defaults`). A :class:`SamplerPlan` is built once per run from the
sampler name, the number of steps, the noise schedule and the start depth; :class:`Sampler`
steps through it (one ``step`` per network call, in the style of diffusers' and MONAI's
schedulers) and :func:`denoise` runs the whole loop, yielding after every step.

Samplers (images in the model range ``[-1, 1]``, epsilon prediction, predicted ``x0`` clipped
to ``[-1, 1]``, scalar coefficients in float64 on the host so the loop never copies between host
and device):

- ``"ddpm"``: ancestral sampling (the reference's, 50 steps at t = 980, 960, ..., 0), each step
  drawing from the exact posterior ``q(x_s | x_t, x0)`` between consecutive timesteps (fixed-small
  variance); one fresh noise draw per step.
- ``"ddim"``: deterministic DDIM (eta = 0).
- ``"dpm"``: DPM-Solver++(2M) (Lu et al. 2022), a deterministic second-order multistep solver in
  x0-prediction, on timesteps evenly spaced in log-SNR.

Per-slice reproducibility: every random draw comes from pre-drawn noise ``(n_draws, B, C, H, W)``;
:func:`slice_noise` draws each slice's noise from its own generator seeded by :func:`slice_seed`,
so a slice's result depends on the run seed, the slice and the member only.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pseudohealthy.engine.defaults import BASELINE_T_START, SAMPLERS, default_steps
from pseudohealthy.model.diffusion import Schedule

__all__ = [
    "Sampler",
    "SamplerPlan",
    "denoise",
    "sampler_timesteps",
    "slice_noise",
    "slice_seed",
]

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def member_key(name: str) -> int:
    """A stable integer for a member name (its seeds do not depend on the other members)."""
    return zlib.crc32(name.encode("utf-8"))


def slice_seed(seed: int, index: int, member: str) -> int:
    """The torch seed of slice ``index`` (canonical axial index) restored by member ``member``.

    Derived with ``np.random.SeedSequence([seed, index, crc32(member)])``, so it depends only on
    the run seed, the slice and the member: not on the batch, the order or the other members.
    """
    return int(np.random.SeedSequence([int(seed), int(index), member_key(member)]).generate_state(1)[0])


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


def sampler_timesteps(sampler: str, steps: int, schedule: Schedule) -> list[int]:
    """Descending timesteps a sampler visits from pure noise (one network call each).

    ``ddpm`` / ``ddim``: evenly spaced from 0 with stride ``T // steps`` (50 steps: 980, 960,
    ..., 0, as the reference). ``dpm``: from ``T-1`` to 0 evenly spaced in the schedule's
    log-SNR, which suits a few-step solver far better than even spacing in t; distinct integers,
    always ending at 0.
    """
    T = schedule.T
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T}, got {steps!r}")
    if sampler != "dpm":
        stride = T // steps
        return [k * stride for k in reversed(range(steps))]
    if steps == 1:
        return [T - 1]
    lam = torch.tensor([0.5 * math.log(a / (1.0 - a)) for a in schedule.abar_list()], dtype=torch.float64)
    targets = torch.linspace(float(lam[-1]), float(lam[0]), steps, dtype=torch.float64)
    ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # nearest t per target
    ts = [min(max(t, steps - 1 - k), T - 1 - k) for k, t in enumerate(ts)]
    ts[-1] = 0
    for k in range(steps - 2, -1, -1):  # distinct: where log-SNR moves fast, take neighbours
        ts[k] = max(ts[k], ts[k + 1] + 1)
    return ts


@dataclass(frozen=True)
class SamplerPlan:
    """What a run's sampler does, resolved once: the timesteps, the noise draws and the start.

    ``timesteps``: descending, one network call each. ``t_start``: partial-noising depth (the
    input is noised to ``timesteps[0] == t_start`` and denoised from there) or None to start from
    pure noise. ``n_draws``: noise draws per slice (the start, plus one per later step for the
    stochastic ``ddpm``).
    """

    sampler: str
    steps: int
    timesteps: tuple[int, ...]
    t_start: int | None = None

    @classmethod
    def build(
        cls, sampler: str, steps: int | None, schedule: Schedule, *, t_start: int | None = None
    ) -> SamplerPlan:
        """The plan of ``sampler`` with ``steps`` (None: its default) from ``t_start`` (None: pure noise)."""
        steps = default_steps(sampler) if steps is None else steps
        ts = sampler_timesteps(sampler, steps, schedule)
        if t_start is not None:
            if isinstance(t_start, bool) or not isinstance(t_start, int) or not 0 <= t_start < schedule.T:
                raise ValueError(f"t_start must be an integer in 0..{schedule.T - 1}, got {t_start!r}")
            ts = [t_start] + [t for t in ts if t < t_start]
        return cls(sampler, int(steps), tuple(ts), t_start)

    @classmethod
    def for_ensemble(
        cls,
        sampler: str,
        steps: int | None,
        schedule: Schedule,
        *,
        conditioned: bool,
        t_start: int | None = None,
    ) -> SamplerPlan:
        """:meth:`build` with the start rule of an ensemble: a conditioned one starts from pure
        noise unless ``t_start`` is given; an unconditioned baseline always noises its input,
        to :data:`BASELINE_T_START` unless ``t_start`` is given."""
        if t_start is None and not conditioned:
            t_start = BASELINE_T_START
        return cls.build(sampler, steps, schedule, t_start=t_start)

    @property
    def n_steps(self) -> int:
        """Network calls per member and slice."""
        return len(self.timesteps)

    @property
    def n_draws(self) -> int:
        """Noise draws per slice."""
        return self.n_steps if self.sampler == "ddpm" else 1


class Sampler:
    """Steps through a :class:`SamplerPlan`: :meth:`start` once, then :meth:`step` per network call.

    Holds the multistep state of ``dpm``; one instance per batch of slices.
    """

    def __init__(self, plan: SamplerPlan, schedule: Schedule):
        self.plan, self.schedule = plan, schedule
        self._prev_x0: torch.Tensor | None = None
        self._prev_h = 0.0

    def start(self, noise: torch.Tensor, x_start: torch.Tensor | None = None) -> torch.Tensor:
        """The first ``x``: draw 0 of ``noise``, or ``x_start`` noised to the plan's ``t_start``."""
        x = noise[0].float()
        if self.plan.t_start is None:
            return x
        if x_start is None:
            raise ValueError("a plan with t_start needs x_start (the image to noise)")
        a = self.schedule.abar(self.plan.timesteps[0])
        return math.sqrt(a) * x_start.float() + math.sqrt(1.0 - a) * x

    def step(self, i: int, x: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x`` at step ``i`` (timestep ``plan.timesteps[i]``) and the network's ``eps`` -> next ``x``."""
        ts = self.plan.timesteps
        t, s = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        a_t, a_s = self.schedule.abar(t), self.schedule.abar(s)
        x0 = ((x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)).clamp(-1.0, 1.0)
        if s < 0:
            return x0  # every sampler's last step lands on the (clipped) x0 prediction
        if self.plan.sampler == "ddpm":
            beta = 1.0 - a_t / a_s
            mean = (math.sqrt(a_s) * beta / (1.0 - a_t)) * x0 + (
                math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
            ) * x
            var = max((1.0 - a_s) / (1.0 - a_t) * beta, 1e-20)
            return mean + math.sqrt(var) * noise[i + 1].float()
        if self.plan.sampler == "ddim":
            return math.sqrt(a_s) * x0 + math.sqrt(1.0 - a_s) * eps
        return self._dpm_step(x, x0, a_t, a_s)

    def _dpm_step(self, x: torch.Tensor, x0: torch.Tensor, a_t: float, a_s: float) -> torch.Tensor:
        """DPM-Solver++(2M): second order once a previous x0 estimate exists."""
        h = 0.5 * math.log(a_s / (1.0 - a_s)) - 0.5 * math.log(a_t / (1.0 - a_t))
        d = x0
        if self._prev_x0 is not None:
            r = self._prev_h / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * self._prev_x0
        self._prev_x0, self._prev_h = x0, h
        return math.sqrt((1.0 - a_s) / (1.0 - a_t)) * x - math.sqrt(a_s) * math.expm1(-h) * d


def denoise(
    model_fn: ModelFn,
    cond: torch.Tensor | None,
    plan: SamplerPlan,
    schedule: Schedule,
    noise: torch.Tensor,
    x_start: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Run ``plan``, yielding ``(step, x)`` after every step (``step`` counts from 1).

    ``model_fn(x_t, t, cond) -> eps`` with ``t`` a (B,) long tensor; ``cond`` None for an
    unconditioned model. ``noise`` is ``(n_draws >= plan.n_draws, B, C, H, W)``. ``x_start``: the
    image in ``[-1, 1]`` that a plan with ``t_start`` noises. After the last step ``x`` is the
    sample in ``[-1, 1]``. Stop iterating to cancel.
    """
    if noise.ndim < 2 or noise.shape[0] < plan.n_draws:
        raise ValueError(f"noise must be (n_draws >= {plan.n_draws}, B, C, H, W), got {tuple(noise.shape)}")
    sampler = Sampler(plan, schedule)
    x = sampler.start(noise, x_start)
    for i, t in enumerate(plan.timesteps):
        with torch.no_grad():  # not across the yield: grad mode must not leak to the caller
            t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x = sampler.step(i, x, model_fn(x, t_vec, cond).float(), noise)
        yield i + 1, x
