"""Checkpoints (a folder: ``model.safetensors`` + ``pseudohealthy.json``) and ensembles of them.

Loading never unpickles anything: weights come from safetensors, settings from JSON. Every
problem raises :class:`~pseudohealthy.errors.CheckpointError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pseudohealthy import __version__
from pseudohealthy.data.files import atomic_write, write_text
from pseudohealthy.device import resolve_device
from pseudohealthy.errors import CheckpointError
from pseudohealthy.model.diffusion import Schedule
from pseudohealthy.model.network import ConditionedUNet, ConfigError, ModelConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INFO_FILE",
    "WEIGHTS_FILE",
    "Ensemble",
    "Member",
    "is_checkpoint_dir",
    "load_checkpoint",
    "read_info",
    "save_checkpoint",
]

FORMAT = "pseudohealthy-checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "pseudohealthy.json"
RESERVED = ("format", "format_version", "package_version", "model", "schedule", "image_size")


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside an EMA / DDP / compiled wrapper."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):  # AveragedModel, DDP
            model = model.module
        else:
            return model


def _jsonable(value: Any) -> Any:
    """``value`` with numpy / torch scalars and arrays, paths and tuples made JSON-ready;
    non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray | np.generic):
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_checkpoint(
    model: nn.Module,
    config: ModelConfig,
    meta: Mapping[str, Any],
    directory: str | Path,
    *,
    schedule: Schedule | None = None,
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``pseudohealthy.json`` into ``directory`` (created).

    ``model`` may be wrapped (``AveragedModel`` for EMA, DDP, ``torch.compile``): the inner
    network's weights are saved, so pass the EMA model to save EMA weights. ``meta`` (JSON-
    serialisable: normalisation, modality, fold, tasks, validation, training settings...) is
    stored at the top level beside the reserved keys (numpy values are converted, NaN becomes
    null). Each file is written atomically (temporary file in ``directory``, then renamed).
    ``weights_dtype`` (e.g. ``torch.float16``) stores floating-point tensors in that type to
    halve the file; they are cast back to the model's type on loading.
    """
    directory = Path(directory)
    clash = sorted(set(meta) & set(RESERVED))
    if clash:
        raise ValueError(f"meta may not set reserved key {clash[0]!r}")
    schedule = schedule or Schedule()
    net = _unwrap(model)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": __version__,
        "model": config.to_dict(),
        "schedule": schedule.to_dict(),
        "image_size": config.image_size,
        **_jsonable(meta),
    }
    text = json.dumps(info, indent=2, allow_nan=False)  # fail (unserialisable meta) before writing
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    if weights_dtype is not None:
        state = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_text(directory / INFO_FILE, text + "\n")
    return directory


def _checkpoint_dir(directory: str | Path) -> Path:
    path = Path(directory)
    if path.is_file() and path.name in (INFO_FILE, WEIGHTS_FILE):
        path = path.parent
    if not path.exists():
        raise CheckpointError(path, "checkpoint folder does not exist")
    if not path.is_dir():
        raise CheckpointError(path, f"not a checkpoint folder (expected a folder with {INFO_FILE})")
    return path


def is_checkpoint_dir(path: str | Path) -> bool:
    """True if ``path`` is a folder holding ``pseudohealthy.json``."""
    return (Path(path) / INFO_FILE).is_file()


def read_info(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``pseudohealthy.json`` (not the weights); returns the dict."""
    path = _checkpoint_dir(directory) / INFO_FILE
    if not path.is_file():
        raise CheckpointError(path, "missing file: not a pseudohealthy checkpoint folder")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"invalid JSON ({exc})") from exc
    if not isinstance(info, dict):
        raise CheckpointError(path, "expected a JSON object")
    for key in RESERVED:
        if key not in info:
            raise CheckpointError(path, "missing field", field=key)
    if info["format"] != FORMAT:
        raise CheckpointError(
            path, f"not a pseudohealthy checkpoint (format {info['format']!r})", field="format"
        )
    version = info["format_version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = "; written by a newer pseudohealthy, please upgrade" if newer else ""
        raise CheckpointError(
            path, f"unsupported version {version!r} (expected {FORMAT_VERSION}){hint}", "format_version"
        )
    if not isinstance(info["package_version"], str):
        raise CheckpointError(path, "must be a string", field="package_version")
    for key, parse in (("model", ModelConfig.from_dict), ("schedule", Schedule.from_dict)):
        try:
            parse(info[key])
        except ConfigError as exc:
            where = f"{key}.{exc.field}" if exc.field else key
            raise CheckpointError(path, exc.problem, field=where) from exc
        except (TypeError, ValueError) as exc:
            raise CheckpointError(path, str(exc), field=key) from exc
    size = info["image_size"]
    if size != info["model"]["image_size"] or isinstance(size, bool):
        raise CheckpointError(path, f"{size!r} disagrees with model.image_size", field="image_size")
    return info


def _check_tensors(
    path: Path, state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> None:
    for name, ref in expected.items():
        if name not in state:
            raise CheckpointError(
                path, "tensor missing (weights do not match the model settings)", field=name
            )
        if tuple(state[name].shape) != tuple(ref.shape):
            raise CheckpointError(
                path,
                f"tensor has shape {tuple(state[name].shape)} but the model settings need {tuple(ref.shape)}",
                field=name,
            )
        if state[name].is_floating_point() != ref.is_floating_point():
            raise CheckpointError(
                path, f"tensor has dtype {state[name].dtype}, expected {ref.dtype}", field=name
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(
            path, "unexpected tensor (weights do not match the model settings)", field=extra[0]
        )


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[ConditionedUNet, dict]:
    """Load a checkpoint folder: ``(model in eval mode on device, info dict)``.

    ``info`` is the JSON content plus ``"path"`` (the folder, as a string).
    """
    folder = _checkpoint_dir(directory)
    info = read_info(folder)
    config = ModelConfig.from_dict(info["model"])
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(weights, "missing file: the checkpoint has no weights")
    try:
        state = load_file(weights, device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
        raise CheckpointError(weights, f"corrupt or truncated weights file ({exc})") from exc
    model = ConditionedUNet(config)
    _check_tensors(weights, state, model.state_dict())
    model.load_state_dict(state, strict=True)
    model.to(resolve_device(device)).eval()
    info = dict(info)
    info["path"] = str(folder)
    return model, info


def _first(info: Mapping[str, Any], *keys: str) -> Any:
    """The first present value among dotted ``keys`` in ``info``."""
    for key in keys:
        value: Any = info
        for part in key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        if value is not None:
            return value
    return None


@dataclass
class Member:
    """One ensemble member: a checkpoint folder whose weights load on first use."""

    path: Path
    name: str
    info: dict[str, Any]
    _models: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dir(cls, path: str | Path, name: str | None = None) -> Member:
        folder = _checkpoint_dir(path)
        return cls(folder, name or folder.resolve().name, read_info(folder))

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.info["model"])

    @property
    def schedule(self) -> Schedule:
        return Schedule.from_dict(self.info["schedule"])

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def conditioned(self) -> bool:
        return bool(self.info["model"]["conditioned"])

    def model(self, device: str | torch.device = "cpu") -> nn.Module:
        """The network on ``device`` (loaded once per device, then cached)."""
        dev = str(resolve_device(device))
        if dev not in self._models:
            self._models[dev], _ = load_checkpoint(self.path, dev)
        return self._models[dev]

    def release(self) -> None:
        """Forget the cached networks (frees their memory)."""
        self._models.clear()

    @property
    def threshold(self) -> float | None:
        """The best-Dice threshold on the member's synthetic validation anomalies, as training
        recorded it (``validation.best_threshold``); None when not recorded."""
        value = _first(self.info, "validation.best_threshold")
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    def describe(self) -> dict[str, Any]:
        """A summary for display: name, path, modality, fold, tasks, validation figures, threshold.

        Reads only the keys the trainer writes (:mod:`pseudohealthy.training`).
        """
        return {
            "name": self.name,
            "path": str(self.path),
            "modality": _first(self.info, "modality"),
            "fold": _first(self.info, "fold"),
            "train_tasks": _first(self.info, "train_tasks"),
            "val_tasks": _first(self.info, "val_tasks"),
            "val_loss": _first(self.info, "validation.best_val_loss"),
            "val_ap": _first(self.info, "validation.best_val_ap"),
            "threshold": self.threshold,
            "image_size": self.image_size,
            "conditioned": self.conditioned,
            "package_version": self.info.get("package_version"),
        }


class Ensemble:
    """Checkpoints used together (their anomaly maps are averaged); all must agree on the
    image size, conditioning, image channels and noise schedule."""

    def __init__(self, members: Sequence[Member], path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.members = list(members)
        where = self.path or (self.members[0].path if self.members else Path("."))
        if not self.members:
            raise CheckpointError(where, "the ensemble has no members")
        ref = self.members[0]
        for m in self.members[1:]:
            for what, get in (
                ("image_size", lambda x: x.image_size),
                ("model.conditioned", lambda x: x.conditioned),
                ("model.image_channels", lambda x: x.info["model"]["image_channels"]),
                ("schedule", lambda x: x.info["schedule"]),
            ):
                if get(m) != get(ref):
                    raise CheckpointError(
                        m.path / INFO_FILE,
                        f"member '{m.name}' has {get(m)!r} but member '{ref.name}' has {get(ref)!r}",
                        field=what,
                    )

    @classmethod
    def from_dir(cls, path: str | Path) -> Ensemble:
        """A folder of member folders (each with ``pseudohealthy.json``) or one member folder."""
        folder = _checkpoint_dir(path)
        if is_checkpoint_dir(folder):
            return cls([Member.from_dir(folder)], folder)
        subdirs = sorted(
            (p for p in folder.iterdir() if p.is_dir() and is_checkpoint_dir(p)), key=lambda p: p.name
        )
        if not subdirs:
            raise CheckpointError(
                folder, f"no checkpoints found: neither it nor a sub-folder has {INFO_FILE}"
            )
        return cls([Member.from_dir(p, p.name) for p in subdirs], folder)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def image_size(self) -> int:
        return self.members[0].image_size

    @property
    def conditioned(self) -> bool:
        return self.members[0].conditioned

    @property
    def schedule(self) -> Schedule:
        return self.members[0].schedule

    def select(self, names: Iterable[str | int]) -> Ensemble:
        """The members with these names (or indices), in the given order."""
        chosen = []
        for key in names:
            if isinstance(key, int) and not isinstance(key, bool):
                if not -len(self) <= key < len(self):
                    raise CheckpointError(self._where, f"no member number {key} (have {len(self)})")
                chosen.append(self.members[key])
                continue
            match = [m for m in self.members if m.name == key]
            if not match:
                raise CheckpointError(self._where, f"no member named {key!r} (have {', '.join(self.names)})")
            chosen.append(match[0])
        return Ensemble(chosen, self.path)

    @property
    def _where(self) -> Path:
        return self.path or self.members[0].path

    def describe(self) -> list[dict[str, Any]]:
        """One summary dict per member (see :meth:`Member.describe`)."""
        return [m.describe() for m in self.members]

    def release(self) -> None:
        for m in self.members:
            m.release()

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[Member]:
        return iter(self.members)

    def __getitem__(self, index: int) -> Member:
        return self.members[index]

    def __repr__(self) -> str:
        return f"Ensemble({len(self)} members: {', '.join(self.names)})"
