"""Training validation: loss, AP and threshold through the engine, at the inference depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pseudohealthy.data.dataset import ValidationSet
from pseudohealthy.engine.defaults import BASELINE_T_START
from pseudohealthy.model.diffusion import Schedule
from pseudohealthy.model.network import build_model, get_preset
from pseudohealthy.training import validation
from pseudohealthy.training.config import LOG_FIELDS, TrainConfig


def _val_set(n: int = 4, size: int = 32) -> ValidationSet:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    fg = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2.5) ** 2
    x0 = np.where(fg, 0.5 + 0.1 * rng.standard_normal((n, size, size)), 0.0).astype(np.float32)
    mask = np.zeros((n, size, size), dtype=bool)
    mask[:, 12:18, 12:18] = True
    cond = np.where(mask, 0.95, x0).astype(np.float32)
    return ValidationSet(
        x0, cond, mask, np.broadcast_to(fg, (n, size, size)).copy(), np.zeros(n), np.arange(n)
    )


def _model(preset: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model(get_preset(preset))
        with torch.no_grad():
            for p in net.unet.out.parameters():
                p.normal_(0, 0.05)
    return net


def _config() -> TrainConfig:
    return TrainConfig.for_preset(
        "tiny", batch_size=2, device="cpu", quiet=True, val_ap_samples=4, val_ap_steps=2
    )


def test_validation_reports_loss_ap_and_the_best_dice_threshold() -> None:
    scores = validation.validate(_model("tiny"), _val_set(), _config(), schedule=Schedule())
    assert np.isfinite(scores["val_loss"]) and scores["val_loss"] > 0
    assert 0 < scores["val_ap"] <= 1 and 0 <= scores["val_threshold"] <= 1
    again = validation.validate(_model("tiny"), _val_set(), _config(), schedule=Schedule())
    assert again == scores  # fixed seeds: the same model scores the same


def test_baseline_validation_starts_at_the_inference_depth(monkeypatch) -> None:
    seen = []
    real = validation.restore_frame

    def spy(models, names, images, masks, indices, plan, *args, **kwargs):
        seen.append(plan)
        return real(models, names, images, masks, indices, plan, *args, **kwargs)

    monkeypatch.setattr(validation, "restore_frame", spy)
    validation.validate(_model("tiny-baseline"), _val_set(), _config(), schedule=Schedule())
    assert seen and all(plan.t_start == BASELINE_T_START for plan in seen)


def test_a_diverged_model_gives_no_ap_instead_of_stopping_training(caplog) -> None:
    net = _model("tiny")

    class Broken(torch.nn.Module):
        conditioned = True

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x, t, cond=None):
            return self.net(x, t, cond) * float("nan")

    scores = validation.validate(Broken(), _val_set(), _config(), schedule=Schedule())
    assert scores["val_ap"] is None and scores["val_threshold"] is None
    assert "not finite" in caplog.text
    assert not np.isfinite(scores["val_loss"])  # the loss shows the divergence


class _Oracle(torch.nn.Module):
    """Predicts the noise that takes ``x_t`` back to the condition: it restores the condition."""

    conditioned = True

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        self.abar = schedule.alphas_cumprod

    def forward(self, x, t, cond=None):
        a = self.abar.to(x.device)[t.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * cond) / (1 - a).sqrt()


def _skimage_fidelity(rest: np.ndarray, target: np.ndarray, region: np.ndarray) -> tuple[float, float]:
    """SSIM (mean of the full map over ``region``) and PSNR straight from scikit-image."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 1.0}
    maps = [structural_similarity(r, t, full=True, **kw)[1] for r, t in zip(rest, target, strict=True)]
    ssim = float(np.stack(maps)[region].mean())
    with np.errstate(divide="ignore"):  # an exact region: skimage's PSNR is inf, ours the cap
        psnr = float(peak_signal_noise_ratio(target[region], rest[region], data_range=1.0))
    return ssim, min(psnr, validation.PSNR_CAP_DB)


def test_a_perfect_restoration_has_ssim_1_and_the_capped_psnr() -> None:
    val = _val_set()
    val.cond[:] = val.x0  # the oracle then restores the clean target itself
    scores = validation.validate(_Oracle(Schedule()), val, _config(), schedule=Schedule())
    for where in ("out", "in"):
        assert scores[f"val_ssim_{where}"] == pytest.approx(1.0, abs=1e-5)
        assert scores[f"val_psnr_{where}"] == validation.PSNR_CAP_DB


def test_a_corrupted_restoration_loses_fidelity_inside_the_anomaly() -> None:
    val = _val_set()  # the oracle restores the corrupted condition: wrong inside the mask only
    scores = validation.validate(_Oracle(Schedule()), val, _config(), schedule=Schedule())
    assert scores["val_ssim_in"] < scores["val_ssim_out"] < 1
    assert scores["val_psnr_in"] < scores["val_psnr_out"]
    rest = np.clip(val.cond, 0, 1).astype(np.float64)  # what the oracle restores
    for where, region in (("out", val.fg & ~val.mask), ("in", val.mask)):
        ssim, psnr = _skimage_fidelity(rest, val.x0.astype(np.float64), region)
        assert scores[f"val_ssim_{where}"] == pytest.approx(ssim, abs=1e-4)
        assert scores[f"val_psnr_{where}"] == pytest.approx(psnr, abs=1e-2)
    assert set(validation.FIDELITY_FIELDS) <= set(LOG_FIELDS)


def test_region_fidelity_equals_scikit_image() -> None:
    rng = np.random.default_rng(1)
    target = rng.uniform(0, 1, (3, 24, 24))
    rest = np.clip(target + 0.1 * rng.standard_normal(target.shape), 0, 1)
    region = rng.uniform(size=target.shape) < 0.3
    ssim, psnr = validation.region_fidelity(rest, target, region)
    want_ssim, want_psnr = _skimage_fidelity(rest, target, region)
    assert ssim == pytest.approx(want_ssim, abs=1e-12) and psnr == pytest.approx(want_psnr, abs=1e-9)
    assert validation.region_fidelity(rest, target, np.zeros_like(region)) == (None, None)
    text = validation.format_fidelity(validation.restoration_fidelity(rest, target, region, ~region))
    assert text.startswith(", SSIM out/in ") and text.endswith(" dB")
