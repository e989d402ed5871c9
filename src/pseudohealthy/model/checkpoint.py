"""Checkpoints (a folder: ``model.safetensors`` + ``pseudohealthy.json``) and ensembles of them.

Loading never unpickles anything: weights come from safetensors, settings from JSON. Every
problem raises :class:`~pseudohealthy.errors.CheckpointError` naming the file and the field.

Loading is checked in an order that never allocates more than the files hold: the JSON settings
against their bounds (:meth:`ModelConfig.validate`, :class:`Schedule`), then the safetensors
header (tensor names, shapes and dtypes, read without the tensors) against the network those
settings describe (built on the ``meta`` device, which allocates nothing), and the settings
the weights were saved with (recorded in the header's metadata) against the JSON; only then are
the tensors read, checked to be finite, and the network built.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pseudohealthy import __version__
from pseudohealthy.data.files import atomic_write, write_text
from pseudohealthy.data.preprocess import check_fov
from pseudohealthy.device import resolve_device
from pseudohealthy.errors import CheckpointError
from pseudohealthy.model.diffusion import LEGACY_SCHEDULE, PREDICTIONS, Schedule
from pseudohealthy.model.network import ConditionedUNet, ConfigError, ModelConfig

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "INFO_FILE",
    "PREDICTIONS",
    "WEIGHTS_FILE",
    "Ensemble",
    "Member",
    "check_weights",
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
UNKNOWN_MODALITY = "unknown"  # the trainer's default: a member that does not know its modality
# weights formats that hold pickles: never loaded, only recognised to say so
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
# the header metadata that records the settings the weights were saved with
META_MODEL, META_SCHEDULE = "pseudohealthy.model", "pseudohealthy.schedule"
RUNTIME_SETTINGS = ("use_flash_attention",)  # model settings that may change after training

MAX_INFO_BYTES = 16 * 2**20  # pseudohealthy.json is a few KB (its data lists grow with the scans)

log = logging.getLogger(__name__)


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
    header = {"format": "pt", **_weights_record(info)}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata=header))
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
    size = path.stat().st_size
    if size > MAX_INFO_BYTES:
        limit = f"{MAX_INFO_BYTES:,}"
        raise CheckpointError(path, f"{size:,} bytes, too large for checkpoint settings (at most {limit})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"invalid JSON ({exc})") from exc
    if not isinstance(info, dict):
        raise CheckpointError(path, "expected a JSON object")
    _check_reserved(path, info)
    _check_recorded(path, info)
    return info


def _check_reserved(path: Path, info: Mapping[str, Any]) -> None:
    """The reserved keys: present, of this format, and settings within their bounds."""
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


def _check_recorded(path: Path, info: Mapping[str, Any]) -> None:
    """The trainer's keys that restoring relies on: prediction type, modality, slice size."""
    prediction = info.get("prediction")  # an older key: what schedule.prediction now records
    recorded = info["schedule"].get("prediction", LEGACY_SCHEDULE["prediction"])
    if prediction is not None and prediction != recorded:
        raise CheckpointError(
            path,
            f"unsupported prediction type {prediction!r}: the schedule records {recorded!r} "
            f"(schedule.prediction, one of {', '.join(map(repr, PREDICTIONS))}, is the model's)",
            field="prediction",
        )
    modality = info.get("modality")
    if modality is not None and not isinstance(modality, str):
        raise CheckpointError(path, f"must be a string, got {modality!r}", field="modality")
    norm = info.get("normalisation")
    size = norm.get("size") if isinstance(norm, Mapping) else None
    if size is not None and size != info["image_size"]:
        raise CheckpointError(
            path,
            f"{info['image_size']!r} disagrees with normalisation.size {size!r} (the slice size "
            "the member was trained on)",
            field="image_size",
        )
    try:
        check_fov(norm.get("fov_mm") if isinstance(norm, Mapping) else None)
    except ValueError as exc:
        raise CheckpointError(path, str(exc), field="normalisation.fov_mm") from None


def _weights_record(info: Mapping[str, Any]) -> dict[str, str]:
    """The settings the weights depend on, as the weights file's header metadata records them."""
    model = {k: v for k, v in info["model"].items() if k not in RUNTIME_SETTINGS}
    return {
        META_MODEL: json.dumps(model, sort_keys=True),
        META_SCHEDULE: json.dumps(info["schedule"], sort_keys=True),
    }


@functools.lru_cache(maxsize=8)
def _expected_tensors(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """``{name: (shape, is floating point)}`` of the network ``config`` describes, built on the
    ``meta`` device (no memory is allocated for its tensors)."""
    with torch.device("meta"):
        net = ConditionedUNet(config)
    return {k: (tuple(v.shape), v.is_floating_point()) for k, v in net.state_dict().items()}


def _read_header(weights: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """``({name: (shape, dtype)}, metadata)`` from a safetensors header; the tensors are not read."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            tensors = {}
            for name in handle.keys():  # a safetensors handle, not a dict
                part = handle.get_slice(name)
                tensors[name] = (tuple(part.get_shape()), str(part.get_dtype()))
            return tensors, dict(handle.metadata() or {})
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
        raise CheckpointError(weights, f"corrupt or truncated weights file ({exc})") from exc


def _n_values(shape: Sequence[int]) -> int:
    return math.prod(shape)


_Found = Mapping[str, tuple[tuple[int, ...], str]]  # name -> (shape, safetensors dtype)
_Expected = Mapping[str, tuple[tuple[int, ...], bool]]  # name -> (shape, floating point)


def _check_shapes(path: Path, found: _Found, expected: _Expected) -> None:
    """Every tensor the settings need, of the right shape and kind, and no other."""
    need = sum(_n_values(shape) for shape, _ in expected.values())
    have = sum(_n_values(shape) for shape, _ in found.values())
    counts = f"the weights hold {have:,} values, the model settings need {need:,}"
    for name, (shape, floating) in expected.items():
        if name not in found:
            raise CheckpointError(
                path, f"tensor missing (weights do not match the model settings; {counts})", field=name
            )
        got, dtype = found[name]
        if got != shape:
            raise CheckpointError(
                path, f"tensor has shape {got} but the model settings need {shape} ({counts})", field=name
            )
        if dtype.startswith(("F", "BF")) != floating:
            kind = "floating-point" if floating else "integer"
            raise CheckpointError(path, f"tensor has dtype {dtype}, expected {kind}", field=name)
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(
            path, "unexpected tensor (weights do not match the model settings)", field=extra[0]
        )


def _check_record(folder: Path, info: Mapping[str, Any], metadata: Mapping[str, str]) -> None:
    """The JSON's settings against those the weights were saved with (when the header has them)."""
    ours = _weights_record(info)
    for key, section in ((META_MODEL, "model"), (META_SCHEDULE, "schedule")):
        if key not in metadata:
            continue  # written before the record existed (the shapes were checked)
        try:
            saved = json.loads(metadata[key])
        except json.JSONDecodeError as exc:
            raise CheckpointError(folder / WEIGHTS_FILE, f"invalid header metadata {key!r}") from exc
        now = json.loads(ours[key])
        if not isinstance(saved, dict):
            raise CheckpointError(folder / WEIGHTS_FILE, f"invalid header metadata {key!r}")
        if section == "schedule":  # a field written before it existed has its legacy value
            saved, now = {**LEGACY_SCHEDULE, **saved}, {**LEGACY_SCHEDULE, **now}
        for name in sorted(set(saved) | set(now)):
            if saved.get(name) != now.get(name):
                where = "image_size" if (section, name) == ("model", "image_size") else f"{section}.{name}"
                raise CheckpointError(
                    folder / INFO_FILE,
                    f"{now.get(name)!r} disagrees with the weights, saved with {saved.get(name)!r}",
                    field=where,
                )


def _weights_file(folder: Path) -> Path:
    """``folder/model.safetensors``; a folder with only pickled weights is told they are not read."""
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            weights,
            f"missing file: found {pickles[0]}, but only safetensors weights are read "
            "(pickled PyTorch files are never loaded)",
        )
    raise CheckpointError(weights, "missing file: the checkpoint has no weights")


def check_weights(directory: str | Path, info: Mapping[str, Any] | None = None) -> Path:
    """Check a checkpoint's weights file against its settings without reading the tensors.

    The safetensors header must list exactly the tensors of the network ``pseudohealthy.json``
    describes, with their shapes (so their count), and agree with the settings recorded when
    the weights were saved (image size, schedule, every setting the weights depend on). Reads
    ``info`` from the folder when not given; returns the weights file.
    """
    folder = _checkpoint_dir(directory)
    info = read_info(folder) if info is None else info
    weights = _weights_file(folder)
    tensors, metadata = _read_header(weights)
    _check_record(folder, info, metadata)
    _check_shapes(weights, tensors, _expected_tensors(ModelConfig.from_dict(info["model"])))
    return weights


def _check_finite(path: Path, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse weights with a NaN or infinite value, naming the first such tensor (by name)."""
    for name in sorted(state):
        tensor = state[name]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                path,
                f"the weights hold non-finite values ({bad:,} of {tensor.numel():,} are NaN or infinite)",
                field=name,
            )


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[ConditionedUNet, dict]:
    """Load a checkpoint folder: ``(model in eval mode on device, info dict)``.

    ``info`` is the JSON content plus ``"path"`` (the folder, as a string). The settings, then
    the weights' header (:func:`check_weights`) are checked before any tensor is read; weights
    with a NaN or infinite value are refused.
    """
    folder = _checkpoint_dir(directory)
    info = read_info(folder)
    config = ModelConfig.from_dict(info["model"])
    weights = check_weights(folder, info)
    try:
        state = load_file(weights, device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad files
        raise CheckpointError(weights, f"corrupt or truncated weights file ({exc})") from exc
    _check_finite(weights, state)
    model = ConditionedUNet(config)
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
        """The member in ``path``: its settings and its weights' header are checked now
        (:func:`read_info`, :func:`check_weights`), the tensors are read on first use."""
        folder = _checkpoint_dir(path)
        info = read_info(folder)
        check_weights(folder, info)
        return cls(folder, name or folder.resolve().name, info)

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

    @property
    def prediction(self) -> str:
        """What the network predicts (``schedule.prediction``; absent = "epsilon")."""
        return self.schedule.prediction

    @property
    def modality(self) -> str | None:
        """The recorded modality (e.g. "FLAIR"); None when absent or the trainer's "unknown"."""
        value = self.info.get("modality")
        if not isinstance(value, str) or value.strip().lower() in ("", UNKNOWN_MODALITY):
            return None
        return value.strip()

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

    @property
    def threshold_faithful_ssim(self) -> bool:
        """Whether :attr:`threshold` was measured on maps with the reference's SSIM constants
        (``validation.faithful_ssim``; absent: False, the data range 1 of training validation)."""
        return _first(self.info, "validation.faithful_ssim") is True

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


# what members of one ensemble must share: (field named in the error, value of a member)
_MUST_AGREE: tuple[tuple[str, Any], ...] = (
    ("image_size", lambda m: m.image_size),
    ("model.conditioned", lambda m: m.conditioned),
    ("model.image_channels", lambda m: m.info["model"]["image_channels"]),
    ("prediction", lambda m: m.prediction),
    ("schedule", lambda m: m.schedule.to_dict()),  # missing fields read as their legacy values
)


def _looks_like_member(folder: Path) -> bool:
    """Whether a sub-folder of an ensemble folder holds a checkpoint, finished or not: its
    ``pseudohealthy.json``, or a weights file (safetensors or pickle) in it or one level down
    (a member still training has its state in ``train_state/``)."""
    suffixes = (".safetensors", *PICKLE_SUFFIXES)
    if is_checkpoint_dir(folder):
        return True
    for entry in folder.iterdir():
        if entry.is_file() and entry.suffix.lower() in suffixes:
            return True
        if entry.is_dir() and any(p.is_file() and p.suffix.lower() in suffixes for p in entry.iterdir()):
            return True
    return False


def _not_a_member(folder: Path, what: str = "a valid member") -> CheckpointError:
    """The error for a folder that holds checkpoint files but is not a valid member."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles and not (folder / WEIGHTS_FILE).is_file():
        problem = (
            f"it holds {pickles[0]}, but only safetensors weights with a {INFO_FILE} are read "
            "(pickled PyTorch files are never loaded); move it out of the ensemble folder"
        )
    elif (folder / WEIGHTS_FILE).is_file():
        problem = f"it has {WEIGHTS_FILE} but no {INFO_FILE}; move it out of the ensemble folder"
    else:
        problem = (
            f"no {INFO_FILE} (is its training unfinished? finish it with train --resume, "
            "or move it out of the ensemble folder)"
        )
    return CheckpointError(folder, f"not {what}: {problem}")


class Ensemble:
    """Checkpoints used together (their anomaly maps are averaged); all must agree on the
    image size, conditioning, image channels, prediction type, noise schedule and (where
    recorded) modality. A disagreement is a :class:`CheckpointError` naming the member and the
    field."""

    def __init__(self, members: Sequence[Member], path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.members = list(members)
        where = self.path or (self.members[0].path if self.members else Path("."))
        if not self.members:
            raise CheckpointError(where, "the ensemble has no members")
        ref = self.members[0]
        for m in self.members[1:]:
            for what, get in _MUST_AGREE:
                if get(m) != get(ref):
                    raise CheckpointError(
                        m.path / INFO_FILE,
                        f"member '{m.name}' has {get(m)!r} but member '{ref.name}' has {get(ref)!r}",
                        field=what,
                    )
        self._check_modality()

    def _check_modality(self) -> None:
        """Members that record a modality must record the same one (case aside); a member
        without one (absent, or the trainer's "unknown") is not compared."""
        known = [m for m in self.members if m.modality is not None]
        for m in known[1:]:
            if m.modality.lower() != known[0].modality.lower():  # type: ignore[union-attr]
                raise CheckpointError(
                    m.path / INFO_FILE,
                    f"member '{m.name}' was trained on {m.modality!r} but member '{known[0].name}' "
                    f"on {known[0].modality!r}",
                    field="modality",
                )

    @classmethod
    def from_dir(cls, path: str | Path) -> Ensemble:
        """One member folder (holding ``pseudohealthy.json``), or a folder of member folders.

        In a folder of members, every sub-folder that holds a checkpoint, finished or not (its
        ``pseudohealthy.json``, or a weights file, safetensors or pickled, in it or one level
        down, such as an unfinished training's ``train_state/``), is a member and must be a
        valid one: a :class:`CheckpointError` names the first that is not (no JSON, weights
        only as a ``.pt``, bad settings or weights), it is never skipped. Sub-folders whose
        names start with ``.`` or ``_`` (hidden, temporary) and sub-folders with no checkpoint
        files at all (logs, figures) are not members. Members are taken in name order.
        """
        folder = _checkpoint_dir(path)
        if is_checkpoint_dir(folder):
            return cls([Member.from_dir(folder)], folder)
        if (folder / WEIGHTS_FILE).is_file() or any(
            p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES for p in folder.iterdir()
        ):
            raise _not_a_member(folder, "a member or ensemble folder")
        subdirs = sorted(
            (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))),
            key=lambda p: p.name,
        )
        members = [p for p in subdirs if _looks_like_member(p)]
        if not members:
            raise CheckpointError(
                folder, f"no checkpoints found: neither it nor a sub-folder has {INFO_FILE}"
            )
        for p in members:
            if not is_checkpoint_dir(p):
                raise _not_a_member(p)
        others = [p.name for p in subdirs if p not in members]
        log.debug("%s: sub-folders without checkpoint files (not members): %s", folder, others)
        return cls([Member.from_dir(p, p.name) for p in members], folder)

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
