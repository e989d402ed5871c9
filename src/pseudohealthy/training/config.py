"""Training settings: :class:`TrainConfig` (every setting of one member's training, JSON-ready),
the training lengths and cadences per preset family (:data:`PRESET_TRAINING`, chosen by
:func:`preset_family`), the settings a resumed run must share with the run it continues
(:data:`MUST_MATCH`, with :data:`LEGACY_VALUES` for states saved before a setting existed), the
columns of ``log.csv`` (:data:`LOG_FIELDS`), :class:`TrainError`, and where each fold's member
lives and which seeds it uses (:func:`member_dir`, :func:`member_seed`, :meth:`TrainConfig.net_seed`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pseudohealthy.data.anomalies.style import DEFAULT_STYLE, check_style
from pseudohealthy.data.norms import NORMS
from pseudohealthy.errors import PseudohealthyError
from pseudohealthy.model.diffusion import LEGACY_SCHEDULE, Schedule
from pseudohealthy.model.network import PRESETS, ConfigError, ModelConfig, get_preset

__all__ = [
    "LEGACY_VALUES",
    "LOG_FIELDS",
    "MUST_MATCH",
    "PRESET_TRAINING",
    "TrainConfig",
    "TrainError",
    "member_dir",
    "member_seed",
    "preset_family",
]

FIDELITY_FIELDS = ("val_ssim_out", "val_psnr_out", "val_ssim_in", "val_psnr_in")  # training.validation
LOG_FIELDS = ("step", "loss", "val_loss", "val_ap", *FIDELITY_FIELDS, "lr", "time")
"""The columns of a member's ``log.csv``."""

# Training lengths, cadences and validation protocol per preset family. "paper" is the
# reference's: validation from step 5000 on every held-out slice, corrupted afresh each time.
# Departures for "cpu" and "tiny" (runs of 200-20000 steps, where 5000 steps would be a quarter
# of the run or all of it): validation from the start, on a capped set corrupted once, so that
# successive validation losses compare the model and not the draw of the corruptions. In every
# family early stopping really stops (the reference's ``break`` only left its epoch loop, so it
# trained on): a departure of ours; the best EMA weights are the member either way.
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "paper": {
        "steps": 500_000,
        "val_every": 500,
        "ckpt_every": 2_000,
        "early_stop_patience": 50_000,
        "val_start": 5_000,
        "val_max_slices": None,
        "val_fresh": True,
    },
    "cpu": {
        "steps": 20_000,
        "val_every": 500,
        "ckpt_every": 500,
        "early_stop_patience": 5_000,
        "val_start": 0,
        "val_max_slices": 1000,
        "val_fresh": False,
    },
    "tiny": {
        "steps": 200,
        "val_every": 50,
        "ckpt_every": 50,
        "early_stop_patience": 0,
        "val_start": 0,
        "val_max_slices": 1000,
        "val_fresh": False,
    },
}

# what a run says of a member folder that is already trained
TRAINED_HINT = "use --resume to skip it, with a larger --steps to extend it"

# settings a resumed run must share with the run it continues
MAX_INTENSITY_GAMMA = 1.0  # --intensity-gamma: powers in [1/e, e] at most

MUST_MATCH = (
    "preset",
    "model_overrides",
    "size",
    "fold",
    "batch_size",
    "seed",
    "lr",
    "betas",
    "weight_decay",
    "grad_clip",
    "ema_max_decay",
    "noise_offset",
    "min_snr_gamma",
    "p_none",
    "norm",
    "square",
    "val_fraction",
    "val_max_slices",
    "val_fresh",
    "prediction",
    "zero_snr",
    "centred",
    "init_seed",
    "init_from",
    "task_style",
    "intensity_gamma",
)

# what a resumable state saved before a MUST_MATCH setting existed was trained with: the legacy
# schedule ([-1, 1] epsilon models), networks initialised from the member seed, fixed validation.
# task_style: state.saved_config fills a setting a state lacks from here (one left out reads as
# None, and no resume would match it), so the value must be the tasks such a state really used.
# Training used the legacy tasks until "Faithful by default" (f1da443, 2026-12-02) and only the
# reference's from then until this setting: the states that lack it and survive are all
# "reference" (none from before f1da443 survives; they would also predate the schedule settings).
LEGACY_VALUES: dict[str, Any] = {
    **LEGACY_SCHEDULE,
    "init_seed": None,
    "init_from": None,
    "val_fresh": False,
    "task_style": check_style("reference"),  # a fixed fact of the past, not DEFAULT_STYLE
    "intensity_gamma": 0.0,  # no intensity augmentation before the setting existed
}


class TrainError(PseudohealthyError):
    """Training cannot start or continue (bad settings, existing run, mismatched resume)."""


def preset_family(preset: str) -> str:
    """The :data:`PRESET_TRAINING` family of ``preset``: its name or prefix (``tiny-x``), else "cpu"."""
    for name in PRESET_TRAINING:
        if preset == name or preset.startswith(f"{name}-"):
            return name
    return "cpu"


@dataclass
class TrainConfig:
    """Every setting of one member's training (JSON-ready via :meth:`to_dict`)."""

    preset: str = "cpu"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    size: int | None = None  # model image size; default: the preset's
    fold: int = 0
    steps: int = 20_000
    batch_size: int = 16
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ema_max_decay: float = 0.9999
    noise_offset: float = 0.1
    min_snr_gamma: float = 1.0
    p_none: float = 0.2
    val_every: int = 500
    val_start: int = 0  # no validation before this step
    val_fraction: float = 0.05
    val_max_slices: int | None = 1000  # None: every held-out slice
    val_fresh: bool = False  # corrupt the held-out slices afresh at each validation
    val_ap_steps: int = 10
    val_ap_samples: int = 16
    ckpt_every: int = 500
    early_stop_patience: int = 5_000
    log_every: int = 50
    num_workers: int = 0
    seed: int = 0
    init_seed: int | None = 42  # network initialisation, shared by the folds; None: the member seed
    init_from: str | None = None  # a member folder whose weights the network starts from
    prediction: str = "epsilon"  # what the network predicts (model.diffusion.PREDICTIONS)
    zero_snr: bool = False  # rescale the betas to a zero terminal SNR (needs v or sample)
    centred: bool = False  # model range [-1, 1] (older checkpoints) instead of the reference's [0, 1]
    task_style: str = DEFAULT_STYLE  # the synthetic tasks' details (data.anomalies.style.STYLES)
    intensity_gamma: float = 0.0  # training samples raised to exp(U(-a, a)) (CorruptedSliceDataset)
    device: str = "auto"
    precision: str = "auto"
    norm: str = NORMS[0]
    square: str = "pad"
    inter_dir: str | None = None
    modality: str = "unknown"
    quiet: bool = False
    step_delay: float = 0.0  # seconds to sleep after each step (testing aid)

    @classmethod
    def for_preset(cls, preset: str, **overrides: Any) -> TrainConfig:
        """Defaults for ``preset`` (lengths, cadences and validation from :data:`PRESET_TRAINING`),
        then ``overrides`` (None included: ``init_seed=None`` and ``val_max_slices=None`` are settings)."""
        values: dict[str, Any] = {"preset": preset, **PRESET_TRAINING[preset_family(preset)], **overrides}
        return cls(**values)

    def model_config(self) -> ModelConfig:
        """The network settings: the preset, its overrides and ``size``."""
        overrides = dict(self.model_overrides)
        if self.size is not None:
            overrides["image_size"] = int(self.size)
        return get_preset(self.preset, **overrides)

    @property
    def image_size(self) -> int:
        return self.model_config().image_size

    def schedule(self) -> Schedule:
        """The diffusion schedule: the reference's betas with this run's prediction and range."""
        return Schedule(prediction=self.prediction, zero_snr=bool(self.zero_snr), centred=bool(self.centred))

    def net_seed(self) -> int:
        """The seed of the network initialisation: ``init_seed``, or the member seed when None."""
        return member_seed(self.seed, self.fold) if self.init_seed is None else int(self.init_seed)

    def validate(self) -> None:
        """Raise :class:`TrainError` (or ConfigError) for a setting that cannot work."""
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown model preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if isinstance(self.fold, bool) or not isinstance(self.fold, int) or not 0 <= self.fold <= 9:
            raise TrainError(f"fold must be 0-9, got {self.fold!r}")
        positive = ("steps", "batch_size")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise TrainError(f"{name} must be at least 1, got {getattr(self, name)}")
        nonnegative = (
            "val_every",
            "val_start",
            "ckpt_every",
            "early_stop_patience",
            "num_workers",
            "val_ap_samples",
        )
        for name in nonnegative:
            if int(getattr(self, name)) < 0:
                raise TrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1 or self.val_ap_steps < 1:
            raise TrainError("log_every and val_ap_steps must be at least 1")
        if not self.lr > 0:
            raise TrainError(f"the learning rate must be positive, got {self.lr}")
        gamma = float(self.intensity_gamma)
        if not 0.0 <= gamma <= MAX_INTENSITY_GAMMA:
            raise TrainError(f"intensity_gamma must be in [0, {MAX_INTENSITY_GAMMA}], got {gamma}")
        if self.norm not in NORMS:
            raise TrainError(f"unknown normalisation {self.norm!r} (use one of {', '.join(NORMS)})")
        try:
            check_style(self.task_style)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        self._validate_diffusion()
        self.model_config()

    def _validate_diffusion(self) -> None:
        """The prediction type and zero terminal SNR, as :class:`Schedule` checks them."""
        try:
            self.schedule()
        except ConfigError as exc:
            value = getattr(self, exc.field, None) if exc.field else None
            raise TrainError(f"cannot train with {exc.field}={value!r}: {exc.problem}") from exc

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


def member_seed(seed: int, fold: int) -> int:
    """The seed of fold ``fold``'s member (distinct init, batch order and corruptions per fold)."""
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def member_dir(run_dir: str | Path, fold: int) -> Path:
    """``RUN_DIR/fold_K``: the member folder (what ``restore`` loads) and its training state."""
    return Path(run_dir) / f"fold_{int(fold)}"
