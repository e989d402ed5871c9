"""Noise schedule, training loss and samplers, checked against MONAI's schedulers and closed forms."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from pseudohealthy.model.diffusion import Schedule, training_loss
from pseudohealthy.model.network import ConfigError, build_model

SHAPE = (2, 1, 8, 8)


def test_model_range_round_trip() -> None:
    x = torch.rand(4, 4)
    for centred in (True, False):
        s = Schedule(centred=centred)
        inside = s.to_model(x)
        torch.testing.assert_close(inside, 2 * x - 1 if centred else x)
        torch.testing.assert_close(s.from_model(inside), x)
        assert s.from_model(torch.tensor([-3.0, 3.0])).tolist() == [0.0, 1.0]  # clamped


def test_linear_schedule_equals_monai_linear_beta() -> None:
    ours, monai = Schedule(), DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta")
    torch.testing.assert_close(ours.betas, monai.betas, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(ours.alphas_cumprod, monai.alphas_cumprod, atol=1e-6, rtol=1e-4)
    # "linear" is linear in beta: constant increments from 1e-4 to 0.02
    assert ours.betas[0].item() == pytest.approx(1e-4) and ours.betas[-1].item() == pytest.approx(0.02)
    assert torch.diff(ours.betas.double()).std() < 1e-9
    scaled = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta")
    torch.testing.assert_close(Schedule(kind="scaled_linear").betas, scaled.betas, atol=1e-9, rtol=1e-6)


def test_schedule_snr_q_sample_and_dict() -> None:
    s = Schedule()
    snr = s.snr(torch.arange(1000))
    assert torch.all(torch.diff(snr) < 0) and snr[-1] < 1e-4 and snr[0] > 1e3
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 999])
    xt = s.q_sample(x0, t, noise)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert Schedule.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError) as err:
        Schedule.from_dict({**s.to_dict(), "kind": "quadratic"})
    assert err.value.field == "kind"
    with pytest.raises(ConfigError) as err:
        Schedule.from_dict({"T": 1000})
    assert err.value.field == "beta_start"


def test_training_loss_matches_its_definition() -> None:
    s = Schedule()
    x0 = torch.rand(SHAPE) * 2 - 1
    t = torch.tensor([5, 700])

    def zero_model(x: torch.Tensor, tt: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return torch.zeros_like(x)

    loss, per = training_loss(
        zero_model, x0, None, s, generator=torch.Generator().manual_seed(0), t=t, return_per_sample=True
    )
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g) + 0.1 * torch.randn((2, 1, 1, 1), generator=g)
    snr = s.snr(t)
    expected = noise.square().mean(dim=(1, 2, 3)) * snr.clamp(max=1.0) / snr
    torch.testing.assert_close(per, expected)
    torch.testing.assert_close(loss, expected.mean())
    assert per[0] < 0.01 * per[1]  # Min-SNR down-weights low-noise steps
    plain = training_loss(
        zero_model, x0, None, s, generator=torch.Generator().manual_seed(0), t=t, min_snr_gamma=None
    )
    torch.testing.assert_close(plain, noise.square().mean())


@pytest.mark.parametrize("name", ["tiny", "tiny-baseline"])
def test_loss_decreases_when_overfitting_two_images(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    s = Schedule()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x0 = torch.stack([(xx**2 + yy**2 < 0.5).float(), (xx.abs() < 0.4).float()])[:, None] * 1.6 - 0.8
    x0 = x0.repeat(4, 1, 1, 1)  # 8 samples: 2 images x 4
    cond = x0 if model.conditioned else None
    t_eval = torch.linspace(50, 950, 8).long()

    def eval_loss() -> float:
        with torch.no_grad():
            return training_loss(
                model, x0, cond, s, generator=torch.Generator().manual_seed(1), t=t_eval
            ).item()

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(2)
    for _ in range(30):
        loss = training_loss(model, x0, cond, s, generator=gen)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)
