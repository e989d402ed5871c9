"""Every prediction type (epsilon, v, x0) against MONAI's schedulers: sampler steps, training
targets, the zero-terminal-SNR rescale (Lin et al. 2024) and the one-pass sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from pseudohealthy.engine.sampler import Sampler, SamplerPlan, denoise, sampler_timesteps
from pseudohealthy.model.diffusion import PREDICTIONS, Schedule, training_loss
from pseudohealthy.model.network import ConfigError

SHAPE = (2, 1, 8, 8)
MONAI_NAME = {"epsilon": "epsilon", "v": "v_prediction", "sample": "sample"}
# the (prediction, zero_snr) pairs a schedule allows: epsilon cannot give x0 without signal
CASES = [(p, False) for p in PREDICTIONS] + [("v", True), ("sample", True)]


def _randn(seed: int, shape: tuple[int, ...] = SHAPE, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def fake_net(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """A deterministic stand-in for a network, large enough that x0 is sometimes clipped."""
    tt = t.float().view(-1, 1, 1, 1) / 1000.0
    return 0.7 * x + 0.4 * torch.sin(3 * x + tt) + (0.3 * cond if cond is not None else 0.0)


def _monai(kind: type, schedule: Schedule, prediction: str, **kw):
    """A MONAI scheduler with our schedule's alphas (float32), e.g. after the zero-SNR rescale."""
    sched = kind(
        num_train_timesteps=schedule.T, prediction_type=MONAI_NAME[prediction], clip_sample=True, **kw
    )
    sched.alphas_cumprod = schedule.alphas_cumprod.clone()
    sched.alphas = schedule.alphas.clone()
    sched.betas = schedule.betas.clone()
    return sched


def _lin_algorithm_1(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1 (rescale betas to zero terminal SNR), in float64."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas))
    a0, a_t = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - a_t) * (a0 / (a0 - a_t))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_zero_snr_rescale_is_lin_algorithm_1(kind: str) -> None:
    plain = Schedule(kind=kind)
    zero = Schedule(kind=kind, prediction="v", zero_snr=True)
    if kind == "linear":  # float64 from the definition; the others from our (MONAI-checked) plain betas
        betas = np.linspace(1e-4, 0.02, 1000)
    else:
        abar = np.array(plain.abar_list())
        betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    expected = _lin_algorithm_1(betas)
    np.testing.assert_allclose(zero.betas.double().numpy(), expected, rtol=1e-6, atol=1e-9)
    abar = np.cumprod(1.0 - expected)
    np.testing.assert_allclose(zero.abar_list(), abar, rtol=1e-9, atol=1e-15)
    assert zero.abar(zero.T - 1) == 0.0 and float(zero.snr(zero.T - 1)) == 0.0
    assert zero.abar(0) == pytest.approx(plain.abar(0), rel=1e-12)  # the first step is kept
    assert all(a > 0 for a in zero.abar_list()[:-1])


def test_zero_snr_needs_v_or_sample_and_fields_are_checked() -> None:
    with pytest.raises(ConfigError, match="zero_snr needs prediction 'v' or 'sample'") as err:
        Schedule(zero_snr=True)
    assert err.value.field == "zero_snr"
    for field, value in (("prediction", "noise"), ("zero_snr", 1), ("centred", "yes")):
        with pytest.raises(ConfigError) as err:
            Schedule(**{field: value})
        assert err.value.field == field
        with pytest.raises(ConfigError) as err:
            Schedule.from_dict({**Schedule().to_dict(), field: value})
        assert err.value.field == field


def test_old_schedule_json_is_epsilon_centred_and_new_fields_round_trip() -> None:
    old = Schedule.from_dict({"T": 1000, "beta_start": 1e-4, "beta_end": 0.02, "kind": "linear"})
    assert (old.prediction, old.zero_snr, old.centred) == ("epsilon", False, True)
    x01 = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(old.to_model(x01), 2 * x01 - 1)
    torch.testing.assert_close(old.from_model(old.to_model(x01)), x01)
    new = Schedule()  # the reference's MRI convention: [0, 1] inside the model
    assert (new.prediction, new.zero_snr, new.centred) == ("epsilon", False, False)
    torch.testing.assert_close(new.to_model(x01), x01)
    assert new.from_model(torch.tensor([-0.5, 0.3, 1.7])).tolist() == pytest.approx([0.0, 0.3, 1.0])
    for p, z in CASES:
        s = Schedule(prediction=p, zero_snr=z, centred=not z)
        assert Schedule.from_dict(s.to_dict()) == s and s.to_dict()["prediction"] == p


@pytest.mark.parametrize(("prediction", "zero_snr"), CASES)
def test_training_target_and_noising_equal_monai(prediction: str, zero_snr: bool) -> None:
    """x_t is MONAI's add_noise, the target its noise / get_velocity / sample, for the same draws."""
    s = Schedule(prediction=prediction, zero_snr=zero_snr)
    monai = _monai(DDPMScheduler, s, prediction)
    x0 = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 999])
    out = _randn(2)
    seen = {}

    def model(x: torch.Tensor, tt: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        seen["x_t"] = x
        return out

    gen = torch.Generator().manual_seed(0)
    _, per = training_loss(model, x0, None, s, generator=gen, t=t, min_snr_gamma=None, return_per_sample=True)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g) + 0.1 * torch.randn((2, 1, 1, 1), generator=g)
    torch.testing.assert_close(seen["x_t"], monai.add_noise(x0, noise, t))
    target = {"epsilon": noise, "v": monai.get_velocity(x0, noise, t), "sample": x0}[prediction]
    torch.testing.assert_close(per, (out - target).square().mean(dim=(1, 2, 3)))


@pytest.mark.parametrize(("prediction", "zero_snr"), CASES)
def test_min_snr_weight_per_target_is_finite_at_zero_snr(prediction: str, zero_snr: bool) -> None:
    """Hang et al. 2023: the x0-loss weight min(SNR, gamma) expressed for each target."""
    s = Schedule(prediction=prediction, zero_snr=zero_snr)
    x0, gamma = torch.rand(SHAPE, generator=torch.Generator().manual_seed(3)), 1.0
    t = torch.tensor([10, s.T - 1])

    def model(x: torch.Tensor, tt: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros_like(x)

    def per_sample(g: float | None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        _, per = training_loss(
            model, x0, None, s, generator=gen, t=t, min_snr_gamma=g, return_per_sample=True
        )
        return per

    weighted, plain = per_sample(gamma), per_sample(None)
    assert torch.isfinite(weighted).all()
    abar = torch.tensor([s.abar(int(k)) for k in t], dtype=torch.float64)
    snr = abar / (1 - abar)
    x0_weight = snr.clamp(max=gamma)  # what every form weights the x0 error by
    # the target's error per unit x0 error: eps snr, v snr + 1, x0 1 (so weight = x0_weight / that)
    scale = {"epsilon": snr, "v": snr + 1, "sample": torch.ones_like(snr)}[prediction]
    expected = torch.where(scale > 0, x0_weight / scale.clamp(min=1e-300), torch.ones_like(snr))
    # the SNR is float32 in the loss (1 - abar is computed in float32)
    torch.testing.assert_close(weighted.double(), plain.double() * expected, rtol=1e-4, atol=1e-12)
    if zero_snr:
        assert weighted[1] == 0  # no signal at T - 1: Min-SNR gives the step no weight


def _one_step(plan: SamplerPlan, schedule: Schedule, i: int, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Our step ``i`` with the fake network's output and the variance noise of ``seed``."""
    noise = torch.zeros((i + 2, *SHAPE))
    noise[i + 1] = _randn(seed)
    t = plan.timesteps[i]
    out = fake_net(x, torch.full((2,), t), None)
    return Sampler(plan, schedule).step(i, x, out, noise)


@pytest.mark.parametrize(("prediction", "zero_snr"), CASES)
@pytest.mark.parametrize("t", [999, 640, 37, 0])
def test_ddpm_step_equals_monai(prediction: str, zero_snr: bool, t: int) -> None:
    s = Schedule(prediction=prediction, zero_snr=zero_snr)
    plan = SamplerPlan.build("ddpm", 1000, s)
    i = plan.timesteps.index(t)
    x = _randn(10 + t, scale=1.5)
    ours = _one_step(plan, s, i, x, seed=77)
    monai = _monai(DDPMScheduler, s, prediction)
    gen = torch.Generator().manual_seed(77)
    theirs, x0 = monai.step(fake_net(x, torch.full((2,), t), None), t, x, generator=gen)
    # at t = 0 the step lands on x0: MONAI's mean coefficient beta_0 / (1 - abar_0) is 1 only up to
    # float32 rounding of 1 - abar_0 (1.7e-4 off), so compare with its x0 estimate there
    torch.testing.assert_close(ours, x0 if t == 0 else theirs, atol=2e-5, rtol=1e-4)
    if t == 0:
        torch.testing.assert_close(ours, theirs, atol=0, rtol=2e-4)


@pytest.mark.parametrize(("prediction", "zero_snr"), CASES)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_chain_equals_monai(prediction: str, zero_snr: bool, spacing: str) -> None:
    """Every step of a 20-step DDIM chain (MONAI steps down by T // 20 from the t it is given)."""
    s = Schedule(prediction=prediction, zero_snr=zero_snr)
    steps = 20
    noise = _randn(4, (1, *SHAPE))
    cond = _randn(5)
    plan = SamplerPlan.build("ddim", steps, s, spacing=spacing)
    *_, (_, ours) = denoise(fake_net, cond, plan, s, noise)
    monai = _monai(DDIMScheduler, s, prediction)
    monai.set_timesteps(steps)
    x = noise[0]
    for t in sampler_timesteps("ddim", steps, s, spacing):
        x, _ = monai.step(fake_net(x, torch.full((2,), t), cond), t, x, eta=0.0)
    torch.testing.assert_close(ours, x, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(("prediction", "zero_snr"), CASES)
def test_ddpm_and_dpm_chains_stay_finite_and_clipped(prediction: str, zero_snr: bool) -> None:
    s = Schedule(prediction=prediction, zero_snr=zero_snr)
    for sampler, spacing in (("ddpm", "trailing"), ("ddpm", "leading"), ("dpm", "leading")):
        plan = SamplerPlan.build(sampler, 10, s, spacing=spacing)
        noise = _randn(6, (plan.n_draws, *SHAPE))
        *_, (_, x) = denoise(fake_net, None, plan, s, noise)
        assert torch.isfinite(x).all() and x.abs().max() <= 1.0


def test_trailing_timesteps_follow_lin_table_2() -> None:
    """round(T - k T / steps) - 1 (round half to even, as numpy), exact in fractions."""
    from fractions import Fraction

    s = Schedule()
    assert sampler_timesteps("ddim", 50, s, "trailing") == list(range(999, 18, -20))
    for steps in (1, 2, 3, 7, 10, 13, 16, 33, 50, 999, 1000):
        expected = [round(Fraction(s.T) - Fraction(k * s.T, steps)) - 1 for k in range(steps)]
        for sampler in ("ddpm", "ddim"):
            assert sampler_timesteps(sampler, steps, s, "trailing") == expected, steps
    assert sampler_timesteps("dpm", 10, s, "trailing") == sampler_timesteps("dpm", 10, s, "leading")
    with pytest.raises(ValueError, match="spacing"):
        sampler_timesteps("ddim", 10, s, "linspace")
    assert SamplerPlan.build("ddim", 10, s, spacing="trailing", t_start=250).timesteps == (250, 199, 99)


@pytest.mark.parametrize(("prediction", "zero_snr"), CASES)
@pytest.mark.parametrize("k", [1, 3])
def test_onepass_is_the_mean_of_k_clipped_x0_estimates(prediction: str, zero_snr: bool, k: int) -> None:
    s = Schedule(prediction=prediction, zero_snr=zero_snr)
    plan = SamplerPlan.build("onepass", k, s)
    assert plan.timesteps == (s.T - 1,) * k and plan.n_steps == plan.n_draws == k
    noise = _randn(8, (k, *SHAPE))
    cond = _randn(9)
    steps = list(denoise(fake_net, cond, plan, s, noise))
    monai = _monai(DDIMScheduler, s, prediction)  # its step also returns the clipped x0 estimate
    t = torch.full((2,), s.T - 1)
    x0s = [monai.step(fake_net(noise[j], t, cond), s.T - 1, noise[j])[1] for j in range(k)]
    assert [n for n, _ in steps] == list(range(1, k + 1))
    torch.testing.assert_close(steps[-1][1], torch.stack(x0s).mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steps[0][1], x0s[0], atol=1e-5, rtol=1e-5)  # then the running mean


def test_onepass_from_a_partial_noising_depth() -> None:
    """An unconditioned baseline noises its input to t_start afresh for each of the K draws."""
    s = Schedule(prediction="sample")
    plan = SamplerPlan.for_ensemble("onepass", 2, s, conditioned=False)
    assert plan.timesteps == (250, 250) and plan.n_draws == 2
    x_start, noise = torch.rand(SHAPE, generator=torch.Generator().manual_seed(0)), _randn(1, (2, *SHAPE))
    seen = []

    def spy(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        seen.append(x.clone())
        return fake_net(x, t, cond)

    *_, (_, out) = denoise(spy, None, plan, s, noise, x_start)
    a = s.abar(250)
    starts = [math.sqrt(a) * x_start + math.sqrt(1 - a) * noise[j] for j in range(2)]
    for got, want in zip(seen, starts, strict=True):
        torch.testing.assert_close(got, want)
    t = torch.full((2,), 250)
    expected = torch.stack([fake_net(x, t, None).clamp(-1, 1) for x in starts]).mean(0)
    torch.testing.assert_close(out, expected)


def _tiny_checkpoint(folder, schedule: Schedule, strip: tuple[str, ...] = ()):
    """A tiny member saved with ``schedule``; ``strip``: schedule fields removed from its JSON."""
    import json

    from pseudohealthy.model.checkpoint import INFO_FILE, save_checkpoint
    from pseudohealthy.model.network import build_model

    model = build_model("tiny")
    save_checkpoint(model, model.config, {"fold": 0}, folder, schedule=schedule)
    info = json.loads((folder / INFO_FILE).read_text())
    for name in strip:
        del info["schedule"][name]
    (folder / INFO_FILE).write_text(json.dumps(info))
    return folder


def test_checkpoints_record_the_schedule_and_old_json_loads_as_epsilon_centred(tmp_path) -> None:
    from pseudohealthy.data.sample import resolve_ensemble
    from pseudohealthy.errors import CheckpointError
    from pseudohealthy.model.checkpoint import Ensemble, Member

    legacy = ("prediction", "zero_snr", "centred")
    old = Member.from_dir(_tiny_checkpoint(tmp_path / "old", Schedule(centred=True), strip=legacy))
    assert "centred" not in old.info["schedule"]
    assert (old.prediction, old.schedule.centred, old.schedule.zero_snr) == ("epsilon", True, False)
    demo = Ensemble.from_dir(resolve_ensemble("demo-epsilon"))  # written before the fields existed
    assert "centred" not in demo.members[0].info["schedule"]
    assert demo.schedule.centred and [m.prediction for m in demo] == ["epsilon"] * len(demo.members)
    v = Member.from_dir(_tiny_checkpoint(tmp_path / "v", Schedule(prediction="v", zero_snr=True)))
    assert v.prediction == "v" and v.schedule == Schedule(prediction="v", zero_snr=True)
    # a [0, 1] model whose JSON lost its range would restore as [-1, 1]: the weights' record says no
    with pytest.raises(CheckpointError) as err:
        Member.from_dir(_tiny_checkpoint(tmp_path / "new", Schedule(), strip=("centred",)))
    assert err.value.field == "schedule.centred"


@pytest.mark.parametrize("centred", [True, False])
def test_frame_maps_images_through_the_schedules_range(centred: bool) -> None:
    """An x0-predicting network that returns its condition restores the input exactly, in
    either model range: the engine maps in with ``to_model`` and back with ``from_model``."""
    from pseudohealthy.engine.frame import restore_frame

    s = Schedule(prediction="sample", centred=centred)
    images = torch.rand((3, 16, 16), generator=torch.Generator().manual_seed(0)).numpy()
    seen = []

    def echo(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        seen.append(cond)
        return cond

    masks = np.ones_like(images, dtype=bool)
    plan = SamplerPlan.build("onepass", 2, s)
    frame = restore_frame([echo], ["m"], images, masks, [0, 1, 2], plan, s, seed=0, conditioned=True)
    np.testing.assert_allclose(frame.restorations[0], images, atol=1e-6)
    expected_cond = 2 * images - 1 if centred else images
    np.testing.assert_allclose(seen[0][:, 0].numpy(), expected_cond, atol=1e-6)
