"""How to restore: :class:`RestoreSettings`, validated once, and the plan they give for an ensemble."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from pseudohealthy.data.preprocess import NORMS
from pseudohealthy.engine.defaults import (
    COMPILE_MODES,
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    FAITHFUL_SSIM,
    PRECISIONS,
    SAMPLERS,
    SPACINGS,
    default_steps,
)
from pseudohealthy.engine.sampler import SamplerPlan
from pseudohealthy.errors import PseudohealthyError
from pseudohealthy.model.diffusion import Schedule

__all__ = ["NORMS", "SQUARES", "RestoreSettings", "SettingsError"]

SQUARES = ("pad", "crop")
"""How a slice is made square for the model frame."""


class SettingsError(PseudohealthyError, ValueError):
    """A restoration setting is invalid."""


def _bad(name: str, problem: str) -> SettingsError:
    return SettingsError(f"restore setting '{name}': {problem}")


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | np.integer)


@dataclass
class RestoreSettings:
    """How to restore. ``steps`` counts sampler steps (network calls per member and slice);
    None means the sampler's default (:data:`~pseudohealthy.engine.defaults.DEFAULT_STEPS`).

    ``batch_size``: slices per batch (None: 8 on the CPU, 32 at 128 px on a GPU; halved on a
    CUDA out-of-memory). ``precision``: "auto" (bf16/fp16 autocast on CUDA, bf16 on CPUs with
    avx512_bf16/AMX, else fp32), "fp32", "fp16" or "bf16". ``faithful_ssim``: the reference's SSIM
    constants (data range
    255; the default, :data:`~pseudohealthy.engine.defaults.FAITHFUL_SSIM`), False for data
    range 1. ``t_start``: partial-noising depth; None means
    :data:`~pseudohealthy.engine.defaults.BASELINE_T_START` for an unconditioned ensemble and pure
    noise for a conditioned one. ``norm`` / ``square``: preprocessing overrides (None: from the
    members' metadata, else "max" / "pad"). ``compile``: a ``torch.compile`` mode
    (:data:`~pseudohealthy.engine.defaults.COMPILE_MODES`) or None for eager execution.
    ``spacing``: how ``ddpm`` / ``ddim`` space their timesteps
    (:data:`~pseudohealthy.engine.defaults.SPACINGS`; ``dpm`` and ``onepass`` ignore it).
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"
    faithful_ssim: bool = FAITHFUL_SSIM
    keep_member_maps: bool = False
    t_start: int | None = None
    norm: str | None = None
    square: str | None = None
    compile: str | None = None
    spacing: str = DEFAULT_SPACING

    def __post_init__(self) -> None:
        if self.steps is None and self.sampler in SAMPLERS:
            self.steps = default_steps(self.sampler)

    def validate(self) -> RestoreSettings:
        """Raise :class:`SettingsError` naming the first bad setting; returns self."""
        if self.sampler not in SAMPLERS:
            raise _bad("sampler", f"unknown sampler {self.sampler!r} (use {', '.join(SAMPLERS)})")
        for name in ("steps", "seed"):
            if not _is_int(getattr(self, name)):
                raise _bad(name, f"must be an integer, got {getattr(self, name)!r}")
        if not 1 <= self.steps <= 1000:
            raise _bad("steps", f"must be in 1..1000, got {self.steps}")
        if self.seed < 0:
            raise _bad("seed", f"must be >= 0, got {self.seed}")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            raise _bad("batch_size", f"must be a positive integer or None, got {self.batch_size!r}")
        if self.t_start is not None and not _is_int(self.t_start):
            raise _bad("t_start", f"must be an integer or None, got {self.t_start!r}")
        self._check_choices()
        return self

    def _check_choices(self) -> None:
        for name, allowed in (
            ("precision", PRECISIONS),
            ("norm", (None, *NORMS)),
            ("square", (None, *SQUARES)),
            ("compile", (None, *COMPILE_MODES)),
            ("spacing", SPACINGS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                shown = ", ".join(str(a) for a in allowed)
                raise _bad(name, f"unknown value {value!r} (use {shown})")

    def plan(self, schedule: Schedule, *, conditioned: bool) -> SamplerPlan:
        """The sampler plan of these settings for an ensemble with ``schedule``.

        Raises :class:`SettingsError` when ``t_start`` lies outside the schedule.
        """
        if self.t_start is not None and not 0 <= self.t_start < schedule.T:
            raise _bad("t_start", f"must be in 0..{schedule.T - 1}, got {self.t_start}")
        return SamplerPlan.for_ensemble(
            self.sampler,
            self.steps,
            schedule,
            conditioned=conditioned,
            t_start=self.t_start,
            spacing=self.spacing,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
