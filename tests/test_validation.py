"""Training validation: loss, AP and threshold through the engine, at the inference depth."""

from __future__ import annotations

import numpy as np
import torch

from pseudohealthy.data.dataset import ValidationSet
from pseudohealthy.engine.defaults import BASELINE_T_START
from pseudohealthy.model.diffusion import Schedule
from pseudohealthy.model.network import build_model, get_preset
from pseudohealthy.training import validation
from pseudohealthy.training.config import TrainConfig


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
