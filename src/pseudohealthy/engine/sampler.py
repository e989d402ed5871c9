"""The samplers and their one plan: which timesteps, how many noise draws, where partial noising starts.

Every rule of sampling has its home here (the names and defaults the faces offer are in
:mod:`pseudohealthy.engine.defaults`). A :class:`SamplerPlan` is built once per run from the
sampler name, the number of steps, the noise schedule and the start depth; :class:`Sampler`
steps through it (one ``step`` per network call, in the style of diffusers' and MONAI's
schedulers) and :func:`denoise` runs the whole loop, yielding after every step.

Samplers (images in the model range of the schedule, :meth:`~pseudohealthy.model.diffusion.Schedule.to_model`;
the network output is read as the schedule's ``prediction``, epsilon, v or x0, through
``Schedule.x0_from`` / ``eps_from``; predicted ``x0`` clipped to ``[-1, 1]``; scalar coefficients
in float64 on the host so the loop never copies between host and device):

- ``"ddpm"``: ancestral sampling (the reference's, 50 steps at t = 980, 960, ..., 0), each step
  drawing from the exact posterior ``q(x_s | x_t, x0)`` between consecutive timesteps (fixed-small
  variance); one fresh noise draw per step.
- ``"ddim"``: deterministic DDIM (eta = 0).
- ``"dpm"``: DPM-Solver++(2M) (Lu et al. 2022), a deterministic second-order multistep solver in
  x0-prediction, on timesteps evenly spaced in log-SNR (the ``spacing`` setting does not apply).
- ``"onepass"``: ``steps`` = K independent single network passes, each from its own pure noise
  at ``t = T - 1`` (or the input noised to ``t_start``); the result is the mean of the K clipped
  x0 estimates (as DISYRE averages its draws). K noise draws, no chain.

``ddpm`` and ``ddim`` space their timesteps "leading" (stride ``T // steps`` from 0, the
reference's) or "trailing" (Lin et al. 2024, Table 2: ``round(T - k T / steps) - 1``, starting
at ``T - 1``, where a zero-terminal-SNR schedule has no signal left).

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

from pseudohealthy.engine.defaults import BASELINE_T_START, DEFAULT_SPACING, SAMPLERS, SPACINGS, default_steps
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


def _log_snr(abar: float) -> float:
    """Half the log-SNR, ``lambda = log(alpha / sigma)``; -inf where no signal is left."""
    return -math.inf if abar <= 0.0 else 0.5 * math.log(abar / (1.0 - abar))


def _check_steps(sampler: str, steps: int, T: int, spacing: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T}, got {steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")


def _log_snr_timesteps(steps: int, schedule: Schedule) -> list[int]:
    """``steps`` distinct timesteps from ``T - 1`` to 0, evenly spaced in log-SNR."""
    T = schedule.T
    if steps == 1:
        return [T - 1]
    lam = torch.tensor([_log_snr(a) for a in schedule.abar_list()], dtype=torch.float64)
    low = float(lam[-1]) if math.isfinite(float(lam[-1])) else float(lam[-2])  # zero SNR: the last finite
    targets = torch.linspace(low, float(lam[0]), steps, dtype=torch.float64)
    ts = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()  # nearest t per target
    ts = [min(max(t, steps - 1 - k), T - 1 - k) for k, t in enumerate(ts)]
    ts[0], ts[-1] = T - 1, 0
    for k in range(steps - 2, -1, -1):  # distinct: where log-SNR moves fast, take neighbours
        ts[k] = max(ts[k], ts[k + 1] + 1)
    return ts


def sampler_timesteps(
    sampler: str, steps: int, schedule: Schedule, spacing: str = DEFAULT_SPACING
) -> list[int]:
    """Descending timesteps a sampler visits from pure noise (one network call each).

    ``ddpm`` / ``ddim``: "leading" strides ``T // steps`` from 0 (50 steps: 980, 960, ..., 0, as
    the reference); "trailing" is ``round(T - k T / steps) - 1`` for k = 0..steps-1 (50 steps:
    999, 979, ..., 19; Lin et al. 2024). ``dpm``: from ``T-1`` to 0 evenly spaced in the
    schedule's log-SNR, which suits a few-step solver far better than even spacing in t;
    distinct integers, always ending at 0. ``onepass``: ``T - 1`` once per draw. ``spacing``
    applies to ``ddpm`` / ``ddim`` only.
    """
    T = schedule.T
    _check_steps(sampler, steps, T, spacing)
    if sampler == "onepass":
        return [T - 1] * steps
    if sampler == "dpm":
        return _log_snr_timesteps(steps, schedule)
    if spacing == "trailing":
        return [int(t) - 1 for t in np.round(np.arange(T, 0, -T / steps))[:steps]]
    stride = T // steps
    return [k * stride for k in reversed(range(steps))]


@dataclass(frozen=True)
class SamplerPlan:
    """What a run's sampler does, resolved once: the timesteps, the noise draws and the start.

    ``timesteps``: descending (``onepass``: the same t per draw), one network call each.
    ``t_start``: partial-noising depth (the input is noised to ``timesteps[0] == t_start`` and
    denoised from there) or None to start from pure noise. ``spacing``: how ``ddpm`` / ``ddim``
    space their timesteps (:data:`~pseudohealthy.engine.defaults.SPACINGS`). ``n_draws``: noise
    draws per slice (the start, plus one per later step for the stochastic ``ddpm``; K for
    ``onepass``).
    """

    sampler: str
    steps: int
    timesteps: tuple[int, ...]
    t_start: int | None = None
    spacing: str = DEFAULT_SPACING

    @classmethod
    def build(
        cls,
        sampler: str,
        steps: int | None,
        schedule: Schedule,
        *,
        t_start: int | None = None,
        spacing: str = DEFAULT_SPACING,
    ) -> SamplerPlan:
        """The plan of ``sampler`` with ``steps`` (None: its default) from ``t_start`` (None: pure
        noise), its timesteps spaced by ``spacing``."""
        steps = default_steps(sampler) if steps is None else steps
        ts = sampler_timesteps(sampler, steps, schedule, spacing)
        if t_start is not None:
            if isinstance(t_start, bool) or not isinstance(t_start, int) or not 0 <= t_start < schedule.T:
                raise ValueError(f"t_start must be an integer in 0..{schedule.T - 1}, got {t_start!r}")
            if sampler == "onepass":
                ts = [t_start] * len(ts)
            else:
                ts = [t_start] + [t for t in ts if t < t_start]
        return cls(sampler, int(steps), tuple(ts), t_start, spacing)

    @classmethod
    def for_ensemble(
        cls,
        sampler: str,
        steps: int | None,
        schedule: Schedule,
        *,
        conditioned: bool,
        t_start: int | None = None,
        spacing: str = DEFAULT_SPACING,
    ) -> SamplerPlan:
        """:meth:`build` with the start rule of an ensemble: a conditioned one starts from pure
        noise unless ``t_start`` is given; an unconditioned baseline always noises its input,
        to :data:`BASELINE_T_START` unless ``t_start`` is given."""
        if t_start is None and not conditioned:
            t_start = BASELINE_T_START
        return cls.build(sampler, steps, schedule, t_start=t_start, spacing=spacing)

    @property
    def n_steps(self) -> int:
        """Network calls per member and slice."""
        return len(self.timesteps)

    @property
    def n_draws(self) -> int:
        """Noise draws per slice."""
        return self.n_steps if self.sampler in ("ddpm", "onepass") else 1


class Sampler:
    """Steps through a :class:`SamplerPlan`: :meth:`start` once, then per network call
    :meth:`model_input` (what the network sees) and :meth:`step` (its output -> the next ``x``).

    Holds the multistep state of ``dpm`` and the running x0 sum of ``onepass``; one instance per
    batch of slices.
    """

    def __init__(self, plan: SamplerPlan, schedule: Schedule):
        self.plan, self.schedule = plan, schedule
        self._prev_x0: torch.Tensor | None = None
        self._prev_h = 0.0
        self._x_start: torch.Tensor | None = None
        self._x0_sum: torch.Tensor | None = None

    def _noised(self, draw: torch.Tensor) -> torch.Tensor:
        """Pure noise ``draw``, or the start image noised to ``t_start`` with it."""
        x = draw.float()
        if self._x_start is None:
            return x
        a = self.schedule.abar(self.plan.timesteps[0])
        return math.sqrt(a) * self._x_start + math.sqrt(1.0 - a) * x

    def start(self, noise: torch.Tensor, x_start: torch.Tensor | None = None) -> torch.Tensor:
        """The first ``x``: draw 0 of ``noise``, or ``x_start`` noised to the plan's ``t_start``."""
        if self.plan.t_start is not None:
            if x_start is None:
                raise ValueError("a plan with t_start needs x_start (the image to noise)")
            self._x_start = x_start.float()
        return self._noised(noise[0])

    def model_input(self, i: int, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network sees at step ``i``: ``x``, or for ``onepass`` draw ``i``'s start."""
        return self._noised(noise[i]) if self.plan.sampler == "onepass" and i > 0 else x

    def step(self, i: int, x: torch.Tensor, output: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x`` at step ``i`` (timestep ``plan.timesteps[i]``) and the network's ``output`` (the
        schedule's prediction) -> next ``x`` (``onepass``: the mean x0 of the draws so far)."""
        ts, sched = self.plan.timesteps, self.schedule
        t, s = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        x0 = sched.clip_x0(sched.x0_from(output, x, t))
        if self.plan.sampler == "onepass":
            self._x0_sum = x0 if self._x0_sum is None else self._x0_sum + x0
            return self._x0_sum / (i + 1)
        if s < 0:
            return x0  # every sampler's last step lands on the (clipped) x0 prediction
        a_t, a_s = sched.abar(t), sched.abar(s)
        if self.plan.sampler == "ddpm":
            beta = 1.0 - a_t / a_s
            mean = (math.sqrt(a_s) * beta / (1.0 - a_t)) * x0 + (
                math.sqrt(1.0 - beta) * (1.0 - a_s) / (1.0 - a_t)
            ) * x
            var = max((1.0 - a_s) / (1.0 - a_t) * beta, 1e-20)
            return mean + math.sqrt(var) * noise[i + 1].float()
        if self.plan.sampler == "ddim":
            return math.sqrt(a_s) * x0 + math.sqrt(1.0 - a_s) * sched.eps_from(output, x, t)
        return self._dpm_step(x, x0, a_t, a_s)

    def _dpm_step(self, x: torch.Tensor, x0: torch.Tensor, a_t: float, a_s: float) -> torch.Tensor:
        """DPM-Solver++(2M): second order once a previous x0 estimate exists (first order after
        a zero-SNR start, where the step in log-SNR is infinite)."""
        h = _log_snr(a_s) - _log_snr(a_t)
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

    ``model_fn(x_t, t, cond) -> output`` (the schedule's prediction) with ``t`` a (B,) long
    tensor; ``cond`` None for an unconditioned model. ``noise`` is ``(n_draws >= plan.n_draws, B,
    C, H, W)``. ``x_start``: the image in the model range that a plan with ``t_start`` noises.
    After the last step ``x`` is the sample in the model range (x0 clipped to ``[-1, 1]``). Stop
    iterating to cancel.
    """
    if noise.ndim < 2 or noise.shape[0] < plan.n_draws:
        raise ValueError(f"noise must be (n_draws >= {plan.n_draws}, B, C, H, W), got {tuple(noise.shape)}")
    sampler = Sampler(plan, schedule)
    x = sampler.start(noise, x_start)
    for i, t in enumerate(plan.timesteps):
        with torch.no_grad():  # not across the yield: grad mode must not leak to the caller
            x = sampler.model_input(i, x, noise)
            t_vec = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
            x = sampler.step(i, x, model_fn(x, t_vec, cond).float(), noise)
        yield i + 1, x
