"""Exponential moving average of a network's weights (decay warm-up as the reference)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "ema_decay"]


def ema_decay(step: int, max_decay: float = 0.9999) -> float:
    """Decay after ``step`` optimiser steps: ``min((1 + s) / (10 + s), max_decay)``."""
    return min((1.0 + step) / (10.0 + step), max_decay)


class EMA:
    """A frozen copy of ``model`` whose weights follow the model's as an exponential average.

    ``update(model, step)`` blends with :func:`ema_decay` of ``step``; buffers are copied.
    ``module`` is the averaged network (eval mode, no gradients).
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9999) -> None:
        self.max_decay = float(max_decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Blend ``model``'s current weights in; returns the decay used."""
        decay = ema_decay(step, self.max_decay)
        ema_params = [p for p in self.module.parameters()]
        params = [p.detach() for p in model.parameters()]
        if len(ema_params) != len(params):
            raise ValueError("EMA and model have different parameters")
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for eb, b in zip(self.module.buffers(), model.buffers(), strict=True):
            eb.copy_(b)
        return decay

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
