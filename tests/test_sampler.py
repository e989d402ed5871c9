"""The samplers and their plan, checked against MONAI's schedulers, closed forms and each other."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from pseudohealthy.engine.defaults import (
    BASELINE_T_START,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    default_steps,
)
from pseudohealthy.engine.sampler import SamplerPlan, denoise, sampler_timesteps, slice_noise
from pseudohealthy.model.diffusion import Schedule
from pseudohealthy.model.network import build_model

SHAPE = (2, 1, 8, 8)


def fake_eps(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """A deterministic stand-in for a network: depends on x, t and the condition."""
    tt = t.float().view(-1, 1, 1, 1) / 1000.0
    return 0.6 * x + 0.3 * torch.sin(3 * x + tt) + (0.2 * cond if cond is not None else 0.0)


def run(
    sampler: str, steps: int, noise: torch.Tensor, cond: torch.Tensor | None = None, **kw
) -> torch.Tensor:
    plan = SamplerPlan.build(sampler, steps, Schedule(), t_start=kw.get("t_start"))
    *_, (_, x) = denoise(fake_eps, cond, plan, Schedule(), noise, kw.get("x_start"))
    return x


def test_sampler_timesteps() -> None:
    assert sampler_timesteps("ddpm", 50, Schedule()) == list(range(980, -1, -20))  # the reference's 50 steps
    assert sampler_timesteps("ddim", 1000, Schedule()) == list(range(999, -1, -1))
    for steps in (1, 2, 7, 25, 999, 1000):
        ts = sampler_timesteps("dpm", steps, Schedule())
        assert len(ts) == len(set(ts)) == steps and ts[0] == 999
        assert ts == sorted(ts, reverse=True) and (steps == 1 or ts[-1] == 0)
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError):
            sampler_timesteps("ddpm", bad, Schedule())
    with pytest.raises(ValueError, match="sampler"):
        sampler_timesteps("euler", 10, Schedule())
    assert sampler_timesteps("onepass", 3, Schedule()) == [999, 999, 999]  # K draws from pure noise
    assert sampler_timesteps("ddpm", 50, Schedule(), "trailing")[:2] == [999, 979]


def _seeded_noise(seeds: list[int]) -> torch.Tensor:
    """One draw per seed, exactly as MONAI's step draws ``torch.randn(shape, generator=...)``."""
    return torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])


def test_ddpm_full_chain_equals_monai() -> None:
    """1000 steps: every step is the single-step posterior that MONAI's DDPMScheduler implements."""
    seeds = list(range(1001))
    noise = _seeded_noise(seeds)
    cond = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5000))
    ours = run("ddpm", 1000, noise, cond)

    sched = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=True)
    x = noise[0]
    for k, t in enumerate(range(999, -1, -1)):
        gen = torch.Generator().manual_seed(seeds[k + 1])  # MONAI draws the same variance noise
        x, _ = sched.step(fake_eps(x, torch.full((2,), t), cond), t, x, generator=gen)
    # 1000 float32 steps (MONAI's coefficients are float32, ours float64): rounding accumulates
    torch.testing.assert_close(ours, x, atol=1e-3, rtol=0)
    assert (ours - x).abs().mean() < 1e-4


@pytest.mark.parametrize("steps", [50, 13])
def test_ddpm_skipped_steps_equal_monai_on_respaced_schedule(steps: int) -> None:
    """With skipped steps DDPM uses the exact posterior between t and t_prev: the same as MONAI's
    single-step DDPM run on the respaced schedule abar'_k = abar[t_k] (Nichol & Dhariwal 2021)."""
    ts = sampler_timesteps("ddpm", steps, Schedule())
    seeds = list(range(100, 100 + steps + 1))
    noise = _seeded_noise(seeds)
    cond = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    ours = run("ddpm", steps, noise, cond)

    abar = Schedule().alphas_cumprod.double()[list(reversed(ts))]  # increasing t
    sched = DDPMScheduler(num_train_timesteps=steps, schedule="linear_beta", clip_sample=True)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    sched.alphas_cumprod = abar.float()
    sched.alphas = (abar / prev).float()
    sched.betas = (1 - abar / prev).float()
    x = noise[0]
    for k, t in enumerate(ts):
        idx = steps - 1 - k  # index into the respaced schedule
        gen = torch.Generator().manual_seed(seeds[k + 1])  # MONAI draws randn(shape) from it
        x, _ = sched.step(fake_eps(x, torch.full((2,), t), cond), idx, x, generator=gen)
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("steps", [50, 20])
def test_ddim_equals_monai(steps: int) -> None:
    noise = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(3))
    cond = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ours = run("ddim", steps, noise, cond)
    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=True)
    sched.set_timesteps(steps)
    x = noise[0]
    for t in sampler_timesteps("ddim", steps, Schedule()):  # MONAI steps down by 1000 // steps from each t
        x, _ = sched.step(fake_eps(x, torch.full((2,), t), cond), t, x, eta=0.0)
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=1e-4)


def _gaussian_oracle(mu: float, s: float):
    """Exact eps-prediction for data x0 ~ N(mu, s^2 I) (so the probability-flow ODE is known)."""
    sched = Schedule()

    def eps(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        a = sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        x0 = mu + alpha * s**2 / (a * s**2 + sigma**2) * (x.double() - alpha * mu)
        return ((x.double() - alpha * x0) / sigma).float()

    def exact(x_T: torch.Tensor, t_T: int) -> torch.Tensor:
        a = sched.alphas_cumprod.double()[t_T]
        return (mu + s * (x_T.double() - a.sqrt() * mu) / (a * s**2 + 1 - a).sqrt()).float()

    return eps, exact


def test_dpm_solver_follows_the_probability_flow_ode() -> None:
    """For Gaussian data the ODE solution is known: DPM-Solver++(2M) converges to it with few
    steps, faster than first-order DDIM on the same timesteps."""
    eps, exact = _gaussian_oracle(mu=0.2, s=0.3)
    x_T = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(0)).clamp(-2, 2)
    sched = Schedule()
    target = exact(x_T[0], 999)
    errors = {}
    for steps in (10, 20, 50):
        *_, (_, x) = denoise(eps, None, SamplerPlan.build("dpm", steps, sched), sched, x_T)
        errors[steps] = (x - target).abs().max().item()
    assert errors[50] < 3e-3 and errors[20] < 1.5e-2 and errors[10] < 3e-2, errors
    assert errors[50] < errors[10]
    ts = sampler_timesteps("dpm", 10, Schedule())
    x = x_T[0]
    for i, t in enumerate(ts):  # 10-step DDIM on the same timesteps, by hand
        a_t = sched.abar(t)
        a_s = sched.abar(ts[i + 1]) if i + 1 < len(ts) else 1.0
        e = eps(x, torch.full((2,), t), None)
        x0 = ((x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)).clamp(-1, 1)
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * e
    assert (x - target).abs().max().item() > 2 * errors[10]


def test_partial_noising_starts_from_the_noised_input() -> None:
    x_start = torch.rand(SHAPE, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
    noise = slice_noise([0, 1], 50, SHAPE[1:])
    sched = Schedule()

    def oracle(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x_start) / (1 - a).sqrt()  # the noise that separates x from x_start

    first = {}

    def spy(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        first.setdefault("x", x.clone())
        first.setdefault("t", int(t[0]))
        return oracle(x, t, cond)

    plan = SamplerPlan.build("ddpm", 50, sched, t_start=250)
    out = list(denoise(spy, None, plan, sched, noise, x_start))
    assert [s for s, _ in out] == list(range(1, 15)) and plan.n_steps == 14  # 250, then 240..0
    a = sched.abar(250)
    torch.testing.assert_close(first["x"], math.sqrt(a) * x_start + math.sqrt(1 - a) * noise[0])
    assert first["t"] == 250
    torch.testing.assert_close(out[-1][1], x_start, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="x_start"):
        next(denoise(spy, None, plan, sched, noise))


def test_slice_noise_is_per_slice() -> None:
    batch = slice_noise([5, 6, 7], 4, (1, 8, 8))
    alone = slice_noise([6], 4, (1, 8, 8))
    assert batch.shape == (4, 3, 1, 8, 8)
    assert torch.equal(batch[:, 1], alone[:, 0])
    assert not torch.equal(batch[:, 0], batch[:, 1])


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm", "onepass"])
def test_result_of_a_slice_does_not_depend_on_the_batch(sampler: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    cond = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1
    steps = 4

    def sample(seeds: list[int], c: torch.Tensor) -> torch.Tensor:
        noise = slice_noise(seeds, steps, (1, 32, 32))
        *_, (_, x) = denoise(model, c, SamplerPlan.build(sampler, steps, Schedule()), Schedule(), noise)
        return x

    batch = sample([11, 12, 13], cond)
    alone = sample([12], cond[1:2])
    # equal up to float rounding (batched convolutions may sum in another order)
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=0)
    other_seed = sample([99], cond[1:2])
    assert (other_seed - alone).abs().max() > 1e-3  # the seed matters
    assert batch.min() >= -1 and batch.max() <= 1


def test_steps_are_yielded_and_cancellable() -> None:
    noise = torch.randn((11, *SHAPE))
    plan = SamplerPlan.build("ddpm", 10, Schedule())
    gen = denoise(fake_eps, None, plan, Schedule(), noise)
    seen = [next(gen)[0] for _ in range(3)]
    gen.close()  # the caller stops iterating: nothing else runs
    assert seen == [1, 2, 3] and plan.n_steps == 10 and plan.n_draws == 10
    with pytest.raises(ValueError, match="noise"):
        list(denoise(fake_eps, None, plan, Schedule(), noise[:5]))
    assert torch.is_grad_enabled()


def test_plan_is_the_one_rule_of_steps_draws_and_start() -> None:
    sched = Schedule()
    plan = SamplerPlan.build("ddpm", None, sched)
    assert plan.steps == DEFAULT_STEPS["ddpm"] == 50 and plan.timesteps == tuple(range(980, -1, -20))
    assert plan.n_steps == plan.n_draws == 50 and plan.t_start is None
    ddim = SamplerPlan.for_ensemble("ddim", 10, sched, conditioned=True)
    assert ddim.t_start is None and ddim.n_draws == 1 and ddim.n_steps == 10
    baseline = SamplerPlan.for_ensemble("ddim", 10, sched, conditioned=False)
    assert baseline.t_start == BASELINE_T_START == 250
    assert baseline.timesteps == (250, 200, 100, 0)  # the start, then the plan's steps below it
    deeper = SamplerPlan.for_ensemble("ddpm", 50, sched, conditioned=False, t_start=500)
    assert deeper.timesteps[0] == 500 and deeper.n_draws == deeper.n_steps == 1 + 25
    assert default_steps(DEFAULT_SAMPLER) == DEFAULT_STEPS[DEFAULT_SAMPLER]
    for bad in (-1, 1000, True):
        with pytest.raises(ValueError, match="t_start"):
            SamplerPlan.build("ddim", 10, sched, t_start=bad)
    with pytest.raises(ValueError, match="sampler"):
        default_steps("euler")
    onepass = SamplerPlan.build("onepass", None, sched)
    assert DEFAULT_STEPS["onepass"] == onepass.steps == onepass.n_draws == onepass.n_steps == 1
    five = SamplerPlan.for_ensemble("onepass", 5, sched, conditioned=False)
    assert five.timesteps == (BASELINE_T_START,) * 5 and five.n_draws == 5
    assert SamplerPlan.build("ddpm", 4, sched).spacing == DEFAULT_SPACING == "leading"
    trailing = SamplerPlan.build("ddpm", 4, sched, spacing="trailing")
    assert trailing.timesteps == (999, 749, 499, 249) and trailing.n_draws == 4


def test_settings_carry_the_spacing_to_the_plan() -> None:
    from pseudohealthy.engine.settings import RestoreSettings, SettingsError

    sched = Schedule()
    settings = RestoreSettings(sampler="ddim", steps=4, spacing="trailing").validate()
    assert settings.plan(sched, conditioned=True).timesteps == (999, 749, 499, 249)
    assert settings.to_dict()["spacing"] == "trailing"
    assert RestoreSettings(sampler="onepass").validate().steps == DEFAULT_STEPS["onepass"]
    with pytest.raises(SettingsError, match="spacing"):
        RestoreSettings(spacing="uniform").validate()
