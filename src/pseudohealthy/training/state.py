"""The resumable state of a member's training, in ``MEMBER/train_state/``: everything that
changes while training (:class:`RunState`: model, EMA, optimiser, grad scaler, noise generator,
step, time, early-stop state), written every ``ckpt_every`` steps as ``state_<step>.safetensors``
(tensors) plus ``state_<step>.json`` (everything else, RNG states included; no pickle) with
``latest.json`` pointing at them; reading and loading it back, the checks that a resumed run has
the settings and data it was started with (a state saved before a setting existed counts as
trained with its :data:`~pseudohealthy.training.config.LEGACY_VALUES`), and the best EMA weights
file (``best_ema_<step>.safetensors``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pseudohealthy.data.files import atomic_write, write_text
from pseudohealthy.model.ema import EMA
from pseudohealthy.training.config import LEGACY_VALUES, MUST_MATCH, TrainConfig, TrainError
from pseudohealthy.training.distributed import DistInfo, gather_objects, unwrap
from pseudohealthy.training.logs import EarlyStop, finite_or_none

__all__ = [
    "LATEST",
    "STATE_DIR",
    "STATE_FORMAT",
    "STATE_VERSION",
    "RunState",
    "check_resume",
    "gather_generators",
    "load_state",
    "read_saved_config",
    "read_state_info",
    "save_best_weights",
    "save_state",
    "saved_config",
]

log = logging.getLogger(__name__)

STATE_DIR = "train_state"
LATEST = "latest.json"
STATE_FORMAT = "pseudohealthy-train-state"
STATE_VERSION = 1


@dataclass
class RunState:
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
    init_from: dict[str, Any] | None = None  # the member the weights started from (its record)


def _write_state_json(path: Path, data: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _rng_states(generators: Sequence[list[int]]) -> dict[str, Any]:
    np_state = np.random.get_state()  # noqa: NPY002 (saved for completeness; unused here)
    return {
        "generators": list(generators),
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *[finite_or_none(float(x)) for x in np_state[2:]]],
    }


def _restore_rng(states: Mapping[str, Any], run: RunState, dist_info: DistInfo) -> None:
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


def gather_generators(run: RunState) -> list[list[int]]:
    """The noise generator state of every rank, in rank order (collective: call on all ranks)."""
    return gather_objects(run.generator.get_state().tolist())


def save_state(
    state_dir: Path, run: RunState, config: TrainConfig, data_summary: Mapping[str, Any], generators: list
) -> None:
    """Write ``state_<step>.safetensors`` + ``state_<step>.json``, then point ``latest.json`` at them."""
    state_dir.mkdir(parents=True, exist_ok=True)
    tag = f"state_{run.step:08d}"
    tensors = {f"model.{k}": v for k, v in _cpu_state(unwrap(run.model)).items()}
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
        "init_from": run.init_from,
        "config": config.to_dict(),
        "data": {k: data_summary[k] for k in ("files", "n_slices", "n_volumes")},
        "saved_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _save_tensors(state_dir / f"{tag}.safetensors", tensors)
    _write_state_json(state_dir / f"{tag}.json", info)
    _write_state_json(state_dir / LATEST, {"step": run.step, "state": f"{tag}.json"})
    keep = {f"{tag}.safetensors", f"{tag}.json", LATEST, run.best_file}
    for old in state_dir.iterdir():
        if old.name not in keep and (old.name.startswith(("state_", "best_ema_"))):
            old.unlink(missing_ok=True)


def read_state_info(state_dir: Path) -> dict[str, Any]:
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


def load_state(state_dir: Path, info: Mapping[str, Any], run: RunState, dist_info: DistInfo) -> None:
    """Load a resumable state (its JSON ``info`` and tensors) into ``run``."""
    try:
        tensors = load_file(state_dir / info["tensors"], device="cpu")
    except Exception as exc:  # safetensors raises its own error types on bad files
        raise TrainError(f"{state_dir / info['tensors']}: unreadable training state ({exc})") from exc

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    unwrap(run.model).load_state_dict(part("model."), strict=True)
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
    run.init_from = info.get("init_from")


def check_resume(
    info: Mapping[str, Any], config: TrainConfig, summary: Mapping[str, Any], where: Path
) -> None:
    """Refuse to continue a run with other settings or other data than it was started with."""
    saved, current = saved_config(info), config.to_dict()
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


def save_best_weights(state_dir: Path, run: RunState) -> None:
    """Write the EMA weights as ``best_ema_<step>.safetensors`` and record it in ``run.best_file``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    name = f"best_ema_{run.step:08d}.safetensors"
    _save_tensors(state_dir / name, _cpu_state(run.ema.module))
    run.best_file = name


def saved_config(info: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings of a state's JSON ``info``, with :data:`LEGACY_VALUES` for the
    settings it predates."""
    return {**LEGACY_VALUES, **info.get("config", {})}


def read_saved_config(out_dir: str | Path) -> dict[str, Any] | None:
    """The training settings stored in a member folder's latest resumable state, if any
    (:func:`saved_config`)."""
    state_dir = Path(out_dir) / STATE_DIR
    if not (state_dir / LATEST).is_file():
        return None
    return saved_config(read_state_info(state_dir))
