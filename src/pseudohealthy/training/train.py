"""Training ensemble members (one per fold of the synthetic-task table).

The loop follows the reference (``REFERENCE.md``, "Training"): Min-SNR-weighted epsilon loss
with offset noise, AdamW with constant lr, grad-norm clipping, an EMA of the weights (used for
validation and for the saved member), mixed precision on CUDA, validation loss on held-out
slices corrupted with the fold's two validation tasks, early stopping on its moving average
(``0.9 ma + 0.1 loss``), keeping the best.

Resuming: the resumable state (model, EMA, optimiser, grad scaler, step, RNG states,
early-stop state) is written every ``ckpt_every`` steps as ``safetensors`` (tensors) plus JSON
(everything else), no pickle. Batches come from (seed, epoch) alone, each sample's corruption
from (seed, epoch, slice) and the diffusion noise from a ``torch.Generator`` whose state is
saved, so a resumed run ends where an uninterrupted one would have (exactly, on the CPU).

Several GPUs or nodes: launch with ``torchrun``; ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` are
read from the environment, batches are sharded over the ranks, the model is wrapped in DDP and
only rank 0 validates and writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pseudohealthy.data.anomalies import TASKS, fold_tasks, load_inter_sources
from pseudohealthy.data.dataset import (
    CorruptedSliceDataset,
    EpochBatchSampler,
    HealthySlices,
    ValidationSet,
    build_validation,
)
from pseudohealthy.device import autocast, autocast_dtype, resolve_device
from pseudohealthy.errors import PseudohealthyError
from pseudohealthy.model.checkpoint import is_checkpoint_dir, save_checkpoint
from pseudohealthy.model.diffusion import (
    Schedule,
    denoise_steps,
    from_model_range,
    slice_noise,
    to_model_range,
    training_loss,
)
from pseudohealthy.model.ema import EMA
from pseudohealthy.model.network import (
    PRESETS,
    ConfigError,
    ModelConfig,
    build_model,
    count_parameters,
    get_preset,
)

__all__ = [
    "MUST_MATCH",
    "PRESET_TRAINING",
    "STATE_DIR",
    "DistInfo",
    "TrainConfig",
    "TrainError",
    "init_distributed",
    "member_dir",
    "member_seed",
    "read_saved_config",
    "train_ensemble",
    "train_member",
    "validate",
]

log = logging.getLogger(__name__)

STATE_DIR = "train_state"
LATEST = "latest.json"
STATE_FORMAT = "pseudohealthy-train-state"
STATE_VERSION = 1
LOG_FIELDS = ("step", "loss", "val_loss", "val_ap", "lr", "time")

# training lengths and cadences per preset family (the reference's for "paper")
PRESET_TRAINING: dict[str, dict[str, int]] = {
    "paper": {"steps": 500_000, "val_every": 500, "ckpt_every": 2_000, "early_stop_patience": 50_000},
    "cpu": {"steps": 20_000, "val_every": 500, "ckpt_every": 500, "early_stop_patience": 5_000},
    "tiny": {"steps": 200, "val_every": 50, "ckpt_every": 50, "early_stop_patience": 0},
}

# settings a resumed run must share with the run it continues
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
)


class TrainError(PseudohealthyError):
    """Training cannot start or continue (bad settings, existing run, mismatched resume)."""


def _family(preset: str) -> str:
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
    val_fraction: float = 0.05
    val_max_slices: int | None = 1000
    val_ap_steps: int = 10
    val_ap_samples: int = 16
    ckpt_every: int = 500
    early_stop_patience: int = 5_000
    log_every: int = 50
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    norm: str = "max"
    square: str = "pad"
    inter_dir: str | None = None
    modality: str = "unknown"
    quiet: bool = False
    step_delay: float = 0.0  # seconds to sleep after each step (testing aid)

    @classmethod
    def for_preset(cls, preset: str, **overrides: Any) -> TrainConfig:
        """Defaults for ``preset`` (lengths and cadences from :data:`PRESET_TRAINING`)."""
        values: dict[str, Any] = {"preset": preset, **PRESET_TRAINING[_family(preset)]}
        values.update({k: v for k, v in overrides.items() if v is not None})
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
        for name in ("val_every", "ckpt_every", "early_stop_patience", "num_workers", "val_ap_samples"):
            if int(getattr(self, name)) < 0:
                raise TrainError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1 or self.val_ap_steps < 1:
            raise TrainError("log_every and val_ap_steps must be at least 1")
        if not self.lr > 0:
            raise TrainError(f"the learning rate must be positive, got {self.lr}")
        if self.norm not in ("max", "percentile"):
            raise TrainError(f"unknown normalisation {self.norm!r} (use 'max' or 'percentile')")
        self.model_config()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    """The process's place in a ``torchrun`` launch (world size 1 without one)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        def get(name: str, default: int) -> int:
            try:
                return int(os.environ.get(name, default))
            except ValueError:
                raise TrainError(f"environment variable {name} must be an integer") from None

        return cls(get("WORLD_SIZE", 1), get("RANK", 0), get("LOCAL_RANK", 0))


def init_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Read the launch from the environment, pick this rank's device, start the process group.

    With ``WORLD_SIZE > 1`` the group is initialised (NCCL on CUDA, gloo on the CPU) unless it
    already is; each rank uses ``cuda:LOCAL_RANK`` when the device is CUDA.
    """
    info = DistInfo.from_env()
    spec = (device or "auto").strip().lower()
    if info.enabled and spec in ("auto", "cuda") and torch.cuda.is_available():
        dev = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    else:
        dev = resolve_device(spec)
    if info.enabled:
        import torch.distributed as dist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


# --------------------------------------------------------------------------- helpers


def member_seed(seed: int, fold: int) -> int:
    """The seed of fold ``fold``'s member (distinct init, batch order and corruptions per fold)."""
    return int(np.random.SeedSequence([int(seed), int(fold)]).generate_state(1)[0])


def member_dir(run_dir: str | Path, fold: int) -> Path:
    """``RUN_DIR/fold_K``: the member folder (what ``restore`` loads) and its training state."""
    return Path(run_dir) / f"fold_{int(fold)}"


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    text = json.dumps(data, indent=1, allow_nan=False)
    _atomic(path, lambda p: Path(p).write_text(text + "\n", encoding="utf-8"))


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def read_saved_config(out_dir: str | Path) -> dict[str, Any] | None:
    """The training settings stored in a member folder's latest resumable state, if any."""
    state_dir = Path(out_dir) / STATE_DIR
    if not (state_dir / LATEST).is_file():
        return None
    return dict(_read_state_info(state_dir).get("config", {}))


# --------------------------------------------------------------------------- early stopping


@dataclass
class EarlyStop:
    """Moving average of the validation loss (``0.9 ma + 0.1 loss``), best value and its step."""

    patience: int = 0
    ma: float | None = None
    best_ma: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    best_val_ap: float | None = None
    last_val_loss: float | None = None
    last_val_ap: float | None = None
    stopped: bool = False

    def update(self, step: int, val_loss: float, val_ap: float | None) -> bool:
        """Record a validation; True when it is the new best."""
        self.ma = val_loss if self.ma is None else 0.9 * self.ma + 0.1 * val_loss
        self.last_val_loss, self.last_val_ap = val_loss, val_ap
        if self.best_ma is None or self.ma < self.best_ma:
            self.best_ma, self.best_step = self.ma, step
            self.best_val_loss, self.best_val_ap = val_loss, val_ap
            return True
        return False

    def should_stop(self, step: int) -> bool:
        return bool(self.patience and self.best_step is not None and step - self.best_step >= self.patience)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: _finite(v) if isinstance(v, float) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], patience: int) -> EarlyStop:
        names = {f.name for f in dataclasses.fields(cls)} - {"patience"}
        return cls(patience=patience, **{k: data.get(k) for k in names})


# --------------------------------------------------------------------------- log


class CsvLog:
    """``log.csv`` (step, loss, val_loss, val_ap, lr, time); a resumed run drops rows past its step."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                rows = [
                    r
                    for r in csv.DictReader(fh)
                    if r.get("step", "").isdigit() and int(r["step"]) <= resume_step
                ]
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, LOG_FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in LOG_FIELDS} for r in rows)

    def write(self, **row: Any) -> None:
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            clean = {k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS}
            for k in ("loss", "val_loss", "val_ap"):
                if isinstance(clean[k], float):
                    clean[k] = f"{clean[k]:.6g}" if math.isfinite(clean[k]) else ""
            if isinstance(clean["time"], float):
                clean["time"] = f"{clean['time']:.2f}"
            csv.DictWriter(fh, LOG_FIELDS).writerow(clean)


def _tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed
        return None
    return SummaryWriter(str(path))


# --------------------------------------------------------------------------- resumable state


@dataclass
class _Run:
    """Everything that changes during training and goes into the resumable state."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    early: EarlyStop
    step: int = 0
    elapsed: float = 0.0
    best_file: str | None = None


def _rng_states(generators: Sequence[list[int]]) -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 (saved for completeness; unused here)
    return {
        "generators": list(generators),
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *[_finite(float(x)) for x in np_state[2:]]],
    }


def _restore_rng(states: Mapping[str, Any], run: _Run, dist_info: DistInfo) -> None:
    gens = states.get("generators") or []
    try:
        if len(gens) != dist_info.world_size:
            raise ValueError(f"the saved run had {len(gens)} rank(s), this one has {dist_info.world_size}")
        run.generator.set_state(torch.tensor(gens[dist_info.rank], dtype=torch.uint8))
    except (RuntimeError, ValueError) as exc:  # other world size or device type
        log.warning("training noise stream restarts (%s)", exc)
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if torch.cuda.is_available() and states.get("cuda"):
        cuda = states["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state(  # noqa: NPY002
        (kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached or 0.0))
    )


def _save_state(
    state_dir: Path, run: _Run, config: TrainConfig, data_summary: Mapping[str, Any], generators: list
) -> None:
    """Write ``state_<step>.safetensors`` + ``state_<step>.json``, then point ``latest.json`` at them."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tag = f"state_{run.step:08d}"
    tensors = {f"model.{k}": v for k, v in _cpu_state(_unwrap(run.model)).items()}
    tensors.update({f"ema.{k}": v for k, v in _cpu_state(run.ema.module).items()})
    opt = run.optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]]
    info = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "step": run.step,
        "elapsed": run.elapsed,
        "tensors": f"{tag}.safetensors",
        "optimizer": {"param_groups": groups, "scalars": scalars},
        "scaler": run.scaler.state_dict(),
        "rng": _rng_states(generators),
        "early_stop": run.early.to_dict(),
        "best_file": run.best_file,
        "config": config.to_dict(),
        "data": {k: data_summary[k] for k in ("files", "n_slices", "n_volumes")},
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _atomic(state_dir / f"{tag}.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _write_json(state_dir / f"{tag}.json", info)
    _write_json(state_dir / LATEST, {"step": run.step, "state": f"{tag}.json"})
    keep = {f"{tag}.safetensors", f"{tag}.json", LATEST, run.best_file}
    for old in state_dir.iterdir():
        if old.name not in keep and (old.name.startswith(("state_", "best_ema_"))):
            old.unlink(missing_ok=True)


def _read_state_info(state_dir: Path) -> dict[str, Any]:
    """The JSON of the latest resumable state."""
    try:
        pointer = json.loads((state_dir / LATEST).read_text(encoding="utf-8"))
        path = state_dir / pointer["state"]
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise TrainError(f"{state_dir}: unreadable training state ({exc})") from exc
    if info.get("format") != STATE_FORMAT or info.get("format_version") != STATE_VERSION:
        raise TrainError(f"{path}: not a resumable training state of this version")
    return info


def _load_state(state_dir: Path, info: Mapping[str, Any], run: _Run, dist_info: DistInfo) -> None:
    """Load a resumable state (its JSON ``info`` and tensors) into ``run``."""
    try:
        tensors = load_file(state_dir / info["tensors"], device="cpu")
    except Exception as exc:  # safetensors raises its own error types on bad files
        raise TrainError(f"{state_dir / info['tensors']}: unreadable training state ({exc})") from exc

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    _unwrap(run.model).load_state_dict(part("model."), strict=True)
    run.ema.load_state_dict(part("ema."))
    opt_state: dict[int, dict[str, Any]] = {}
    for name, value in part("optimizer.").items():
        pid, key = name.split(".", 1)
        opt_state.setdefault(int(pid), {})[key] = value
    for pid, values in info["optimizer"]["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(values)
    groups = run.optimizer.state_dict()["param_groups"]
    for group, saved in zip(groups, info["optimizer"]["param_groups"], strict=True):
        group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items()})
    run.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if info["scaler"]:
        run.scaler.load_state_dict(info["scaler"])
    _restore_rng(info["rng"], run, dist_info)
    run.step, run.elapsed = int(info["step"]), float(info["elapsed"])
    run.early = EarlyStop.from_dict(info["early_stop"], run.early.patience)
    run.best_file = info.get("best_file")


# --------------------------------------------------------------------------- validation


def _batches(n: int, size: int) -> Iterable[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _to_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[:, None].to(device)


@torch.no_grad()
def validate(
    model: nn.Module,
    val: ValidationSet,
    config: TrainConfig,
    *,
    schedule: Schedule | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, float | None]:
    """``val_loss`` (the training loss with fixed t and noise) and ``val_ap`` on ``val``.

    ``val_ap``: pixel AP of anomaly maps (1 - SSIM between a quick DDIM restoration of
    ``config.val_ap_steps`` steps and the corrupted input) against the synthetic masks, on
    ``config.val_ap_samples`` evenly spaced slices (None when they hold no anomaly).
    """
    from sklearn.metrics import average_precision_score

    from pseudohealthy.engine.maps import anomaly_map

    device = torch.device(device)
    schedule = schedule or Schedule()
    conditioned = bool(getattr(_unwrap(model), "conditioned", True))
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(int(seed))
    total, count = 0.0, 0
    bs = max(1, 2 * config.batch_size)
    for sl in _batches(len(val), bs):
        x0 = to_model_range(_to_device(val.x0[sl], device))
        cond = to_model_range(_to_device(val.cond[sl], device)) if conditioned else None
        with autocast(device, config.precision):
            _, per = training_loss(
                model,
                x0,
                cond,
                schedule,
                generator=gen,
                noise_offset=config.noise_offset,
                min_snr_gamma=config.min_snr_gamma,
                return_per_sample=True,
            )
        total += float(per.double().sum())
        count += int(per.numel())
    val_loss = total / max(count, 1)
    val_ap = None
    n_ap = min(config.val_ap_samples, len(val))
    if n_ap > 0:
        pick = np.unique(np.linspace(0, len(val) - 1, n_ap).round().astype(int))
        labels = val.mask[pick]
        if labels.any():
            restored = []
            for sl in _batches(pick.size, bs):
                cond = to_model_range(_to_device(val.cond[pick[sl]], device))
                seeds = [int(seed) + int(i) for i in pick[sl]]
                noise = slice_noise(seeds, 1, cond.shape[1:], device=device)
                kwargs = {} if conditioned else {"x_start": cond, "t_start": schedule.T // 2}
                with autocast(device, config.precision):
                    steps = denoise_steps(
                        model,
                        cond if conditioned else None,
                        schedule,
                        sampler="ddim",
                        steps=config.val_ap_steps,
                        noise=noise,
                        **kwargs,
                    )
                    x = deque(steps, maxlen=1)[0][2]
                restored.append(from_model_range(x.float())[:, 0].cpu().numpy())
            maps = anomaly_map(np.concatenate(restored), val.cond[pick], val.fg[pick])
            val_ap = float(average_precision_score(labels.ravel(), maps.ravel()))
    model.train(was_training)
    return {"val_loss": val_loss, "val_ap": val_ap}


# --------------------------------------------------------------------------- training


def _check_resume(
    info: Mapping[str, Any], config: TrainConfig, summary: Mapping[str, Any], where: Path
) -> None:
    """Refuse to continue a run with other settings or other data than it was started with."""
    saved, current = info.get("config", {}), config.to_dict()
    for name in MUST_MATCH:
        if saved.get(name) != current.get(name):
            raise TrainError(
                f"{where}: cannot resume with {name}={current.get(name)!r}; the run was started with "
                f"{saved.get(name)!r}"
            )
    data = info.get("data", {})
    for name in ("n_slices", "n_volumes", "files"):
        if data.get(name) != summary.get(name):
            raise TrainError(f"{where}: cannot resume on other data ({name} differs from the saved run's)")


def _build_run(
    model_cfg: ModelConfig, config: TrainConfig, device: torch.device, seed: int, rank: int
) -> _Run:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global stream
        torch.manual_seed(seed)
        net = build_model(model_cfg)
    net.to(device)
    ema = EMA(net, config.ema_max_decay)
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(
        net.parameters(),
        lr=config.lr,
        betas=tuple(config.betas),
        weight_decay=config.weight_decay,
        fused=fused,
    )
    amp = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    gen_seed = int(np.random.SeedSequence([seed, rank, 7]).generate_state(1)[0])
    generator = torch.Generator(device=device).manual_seed(gen_seed)  # on the device: no host sync
    return _Run(net, ema, optimizer, scaler, generator, EarlyStop(config.early_stop_patience))


def _gather_generators(run: _Run) -> list[list[int]]:
    state = run.generator.get_state().tolist()
    dist = _dist()
    if dist is None:
        return [state]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def _save_best(state_dir: Path, run: _Run) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    name = f"best_ema_{run.step:08d}.safetensors"
    tensors = _cpu_state(run.ema.module)
    _atomic(state_dir / name, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    run.best_file = name


def train_member(
    data: HealthySlices,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    inter_sources: Sequence[np.ndarray] | None = None,
) -> Path:
    """Train the member of ``config.fold`` on ``data`` into ``out_dir``; returns ``out_dir``.

    ``out_dir`` receives ``model.safetensors`` + ``pseudohealthy.json`` (the EMA weights of the
    best validation, or the last EMA weights without validation; see
    :func:`pseudohealthy.model.checkpoint.save_checkpoint`), ``log.csv`` and ``train_state/`` (the
    resumable state). ``resume`` continues from ``train_state/`` (or skips a finished member);
    without it an existing run is refused.
    """
    config.validate()
    out_dir = Path(out_dir)
    state_dir = out_dir / STATE_DIR
    dist_info, device = init_distributed(config.device)
    main = dist_info.is_main
    model_cfg = config.model_config()
    if model_cfg.image_size != data.size:
        raise TrainError(f"the slices are {data.size} px but the model expects {model_cfg.image_size} px")
    has_state = (state_dir / LATEST).is_file()
    if is_checkpoint_dir(out_dir):
        if resume:
            log.info("%s: already trained, skipped", out_dir)
            return out_dir
        raise TrainError(f"{out_dir}: a trained member is already there (use --resume to skip it)")
    if has_state and not resume:
        raise TrainError(f"{out_dir}: an interrupted run is there (use --resume to continue it)")

    fold = int(config.fold)
    train_tasks, val_tasks = fold_tasks(fold)
    seed = member_seed(config.seed, fold)
    run = _build_run(model_cfg, config, device, seed, dist_info.rank)
    resumed_from = None
    summary = data.summary()
    if resume and has_state:
        info = _read_state_info(state_dir)
        _check_resume(info, config, summary, out_dir)
        _load_state(state_dir, info, run, dist_info)
        resumed_from = run.step
        if main:
            log.info("fold %d: resuming at step %d", fold, run.step)

    if inter_sources is None and 1 in train_tasks + val_tasks:
        inter_sources = load_inter_sources(config.inter_dir, size=data.size)
    dataset = CorruptedSliceDataset(
        data, data.train_index, train_tasks, seed=seed, p_none=config.p_none, inter_sources=inter_sources
    )
    val = None
    if main and config.val_every and data.val_index.size:
        val = build_validation(
            data,
            data.val_index,
            val_tasks,
            seed=seed,
            p_none=config.p_none,
            inter_sources=inter_sources,
            max_slices=config.val_max_slices,
            progress=not config.quiet,
        )
    sampler = EpochBatchSampler(
        len(dataset),
        config.batch_size,
        seed=seed,
        start_step=run.step,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=config.num_workers > 0,
    )
    model: nn.Module = run.model
    if dist_info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    schedule = Schedule()
    amp = autocast_dtype(device, config.precision)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "fold %d: preset %s (%s px, %.2fM parameters), tasks %s, validation %s; %d training / %d "
            "held-out slices; %s, %s, batch %d x %d rank(s)",
            fold,
            config.preset,
            model_cfg.image_size,
            count_parameters(run.model) / 1e6,
            "+".join(TASKS[t] for t in train_tasks),
            "+".join(TASKS[t] for t in val_tasks),
            data.train_index.size,
            data.val_index.size,
            device,
            {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp],
            config.batch_size,
            dist_info.world_size,
        )
    csv_log = CsvLog(out_dir / "log.csv", resumed_from) if main else None
    tb = _tensorboard(out_dir / "tensorboard") if main else None

    from tqdm import tqdm

    bar = tqdm(
        total=config.steps,
        initial=min(run.step, config.steps),
        desc=f"fold {fold}",
        unit="step",
        disable=config.quiet or not main,
        dynamic_ncols=True,
    )
    val_seed = int(np.random.SeedSequence([seed, 99]).generate_state(1)[0])
    running = torch.zeros((), device=device, dtype=torch.float64)
    n_running = 0
    start = time.perf_counter() - run.elapsed
    stop = run.step >= config.steps or run.early.stopped
    batches = iter(loader) if not stop else None
    run.model.train()
    while not stop:
        batch = next(batches)
        x0 = to_model_range(batch["x0"].to(device, non_blocking=True))
        cond = to_model_range(batch["cond"].to(device, non_blocking=True)) if model_cfg.conditioned else None
        with autocast(device, config.precision):
            loss = training_loss(
                model,
                x0,
                cond,
                schedule,
                generator=run.generator,
                noise_offset=config.noise_offset,
                min_snr_gamma=config.min_snr_gamma,
            )
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if config.grad_clip:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.ema.update(run.model, run.step)
        run.step += 1
        running += loss.detach().double()
        n_running += 1
        bar.update(1)
        step = run.step
        run.elapsed = time.perf_counter() - start
        row: dict[str, Any] = {}
        if step % config.log_every == 0 or step == config.steps:
            mean = running / n_running
            dist = _dist()
            if dist is not None:
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            row["loss"] = float(mean)
            running.zero_()
            n_running = 0
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        if config.val_every and (step % config.val_every == 0 or step == config.steps):
            stop_flag = torch.zeros((), device=device)
            if val is not None and len(val):
                scores = validate(
                    run.ema.module, val, config, schedule=schedule, device=device, seed=val_seed
                )
                row.update(scores)
                if run.early.update(step, scores["val_loss"], scores["val_ap"]):
                    _save_best(state_dir, run)
                if run.early.should_stop(step):
                    stop_flag.fill_(1.0)
                if not config.quiet:
                    ap = scores["val_ap"]
                    bar.write(
                        f"fold {fold} step {step}: val_loss {scores['val_loss']:.4f}"
                        + (f", val_ap {ap:.3f}" if ap is not None else "")
                        + f" (best at step {run.early.best_step})"
                    )
            dist = _dist()
            if dist is not None:
                dist.broadcast(stop_flag, src=0)
            if bool(stop_flag):
                run.early.stopped = True
                if main:
                    log.info("fold %d: early stop at step %d (best step %s)", fold, step, run.early.best_step)
        if row and main:
            row.update(step=step, lr=run.optimizer.param_groups[0]["lr"], time=run.elapsed)
            csv_log.write(**row)
            if tb is not None:
                for key in ("loss", "val_loss", "val_ap"):
                    if row.get(key) is not None:
                        tb.add_scalar(key, row[key], step)
        stop = step >= config.steps or run.early.stopped
        if (config.ckpt_every and step % config.ckpt_every == 0) or stop:
            generators = _gather_generators(run)
            if main:
                _save_state(state_dir, run, config, summary, generators)
        if config.step_delay:
            time.sleep(config.step_delay)
    bar.close()
    del batches, loader
    if tb is not None:
        tb.close()
    if main:
        _write_member(out_dir, run, model_cfg, config, data, summary, device, dist_info, amp)
    dist = _dist()
    if dist is not None:
        dist.barrier()
    return out_dir


def _write_member(
    out_dir: Path,
    run: _Run,
    model_cfg: ModelConfig,
    config: TrainConfig,
    data: HealthySlices,
    summary: Mapping[str, Any],
    device: torch.device,
    dist_info: DistInfo,
    amp: torch.dtype | None,
) -> None:
    """The member folder: chosen EMA weights + metadata, via :func:`save_checkpoint`."""
    weights: nn.Module = run.ema.module
    chosen = "ema-last"
    best = out_dir / STATE_DIR / run.best_file if run.best_file else None
    if best is not None and best.is_file():
        weights = build_model(model_cfg)
        weights.load_state_dict(load_file(best, device="cpu"), strict=True)
        chosen = "ema-best"
    train_tasks, val_tasks = fold_tasks(config.fold)
    early = run.early
    meta = {
        "modality": config.modality,
        "fold": int(config.fold),
        "train_tasks": [TASKS[t] for t in train_tasks],
        "val_tasks": [TASKS[t] for t in val_tasks],
        "data": dict(summary),
        "normalisation": data.normalisation(),
        "validation": {
            "best_val_loss": early.best_val_loss,
            "best_val_loss_ma": early.best_ma,
            "best_val_ap": early.best_val_ap,
            "best_step": early.best_step,
            "val_loss": early.last_val_loss,
            "val_ap": early.last_val_ap,
            "early_stopped": early.stopped,
        },
        "training": {
            **config.to_dict(),
            "steps_done": run.step,
            "weights": chosen,
            "device": str(device),
            "precision": {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[amp],
            "world_size": dist_info.world_size,
            "time_s": round(run.elapsed, 2),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        },
    }
    meta["training"].pop("quiet", None)
    meta["training"].pop("step_delay", None)
    save_checkpoint(weights, model_cfg, meta, out_dir)
    log.info("fold %d: member written to %s (%s weights)", config.fold, out_dir, chosen)


def train_ensemble(
    data: HealthySlices,
    run_dir: str | Path,
    config: TrainConfig,
    folds: Iterable[int] = range(10),
    *,
    resume: bool = False,
) -> list[Path]:
    """Train the members of ``folds`` one after the other into ``RUN_DIR/fold_K``."""
    folds = list(folds)
    inter = None
    if any(1 in sum(fold_tasks(f), ()) for f in folds):
        inter = load_inter_sources(config.inter_dir, size=data.size)
    out = []
    for fold in folds:
        cfg = dataclasses.replace(config, fold=int(fold))
        out.append(train_member(data, member_dir(run_dir, fold), cfg, resume=resume, inter_sources=inter))
    return out
