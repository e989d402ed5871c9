"""The restoration engine: pseudo-healthy restorations and anomaly maps of a scan's axial slices.

Every foreground axial slice is brought into the model frame (:func:`~pseudohealthy.data.preprocess.
prepare_scan` at the ensemble's image size), restored by every ensemble member (batched over
slices, members in lockstep, see :mod:`pseudohealthy.engine.batching`), scored with 1 - SSIM in the
model frame and mapped back to the slice's own grid.

- :func:`restore_iter` yields :class:`Progress` after every denoising step and a
  :class:`SliceResult` per slice as soon as its batch is done, in the order of ``slices``.
- :func:`restore_volume` collects a whole run into a :class:`RestoreResult`.

Reproducibility: the noise of slice ``k`` and member ``m`` comes from its own generator seeded
from ``(seed, k, member name)`` (:func:`~pseudohealthy.engine.batching.slice_seed`), so a slice's
result does not depend on the batch size, the order, or which other slices and members run.
An unconditioned (baseline) ensemble restores by partial noising: the input is noised to
``t_start`` (default :data:`~pseudohealthy.engine.batching.DEFAULT_T_START` = 250) and denoised.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pseudohealthy.data.io import Volume, volume_from_array
from pseudohealthy.data.preprocess import PreparedScan, prepare_scan
from pseudohealthy.device import PRECISIONS, DeviceError, autocast_dtype, resolve_device
from pseudohealthy.engine.batching import (
    COMPILE_MODES,
    DEFAULT_T_START,
    _batch_noise,
    _denoise_batch,
    compiled,
    default_batch_size,
    noise_draws,
    run_timesteps,
)
from pseudohealthy.engine.maps import anomaly_map, ensemble_map, slice_scores, volume_score
from pseudohealthy.errors import PseudohealthyError, ScanError
from pseudohealthy.model.checkpoint import Ensemble
from pseudohealthy.model.diffusion import SAMPLERS, Schedule, from_model_range, to_model_range

__all__ = [
    "DEFAULT_T_START",
    "Progress",
    "RestoreResult",
    "RestoreSettings",
    "SettingsError",
    "SliceResult",
    "prepare_for",
    "restore_iter",
    "restore_volume",
]

log = logging.getLogger(__name__)


class SettingsError(PseudohealthyError, ValueError):
    """A restoration setting is invalid."""


@dataclass
class RestoreSettings:
    """How to restore. ``steps`` counts sampler steps (network calls per member and slice).

    ``batch_size``: slices per batch (None: 8 on the CPU, 32 at 128 px on a GPU; halved on a
    CUDA out-of-memory). ``precision``: "auto" (bf16/fp16 autocast on CUDA, fp32 on the CPU),
    "fp32", "fp16" or "bf16". ``faithful_ssim``: the reference's SSIM constants (data range
    255). ``t_start``: partial-noising depth; None means :data:`DEFAULT_T_START` for an
    unconditioned ensemble and pure noise (t = T) for a conditioned one. ``norm`` / ``square``:
    preprocessing overrides (None: from the members' metadata, else "max" / "pad"). ``compile``:
    a ``torch.compile`` mode (:data:`COMPILE_MODES`; "reduce-overhead" adds CUDA graphs) or None
    for eager execution; the first batch of each size pays the compilation.
    """

    sampler: str = "ddpm"
    steps: int = 50
    seed: int = 0
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"
    faithful_ssim: bool = False
    keep_member_maps: bool = False
    t_start: int | None = None
    norm: str | None = None
    square: str | None = None
    compile: str | None = None

    def validate(self) -> RestoreSettings:
        """Raise :class:`SettingsError` naming the first bad setting; returns self."""

        def bad(name: str, problem: str) -> SettingsError:
            return SettingsError(f"restore setting '{name}': {problem}")

        if self.sampler not in SAMPLERS:
            raise bad("sampler", f"unknown sampler {self.sampler!r} (use {', '.join(SAMPLERS)})")
        for name in ("steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise bad(name, f"must be an integer, got {value!r}")
        if not 1 <= self.steps <= 1000:
            raise bad("steps", f"must be in 1..1000, got {self.steps}")
        if self.seed < 0:
            raise bad("seed", f"must be >= 0, got {self.seed}")
        if self.batch_size is not None and (
            isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise bad("batch_size", f"must be a positive integer or None, got {self.batch_size!r}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"unknown precision {self.precision!r} (use {', '.join(PRECISIONS)})")
        if self.t_start is not None and (isinstance(self.t_start, bool) or not isinstance(self.t_start, int)):
            raise bad("t_start", f"must be an integer or None, got {self.t_start!r}")
        if self.norm not in (None, "max", "percentile"):
            raise bad("norm", f"must be 'max' or 'percentile', got {self.norm!r}")
        if self.square not in (None, "pad", "crop"):
            raise bad("square", f"must be 'pad' or 'crop', got {self.square!r}")
        if self.compile not in (None, *COMPILE_MODES):
            raise bad("compile", f"must be None or one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Progress:
    """Progress of a run, in slice-steps: ``done`` of ``total`` (slices x denoising steps)."""

    done: int
    total: int
    message: str = ""
    slices_done: int = 0
    slices_total: int = 0


@dataclass
class SliceResult:
    """One restored axial slice, in the canonical slice grid ``(X, Y)``.

    ``restoration``: member mean in normalised [0, 1] units (0 outside the foreground);
    ``pseudo_healthy``: the same in the scan's own intensity units (the input outside the
    foreground); ``anomaly``: ensemble 1 - SSIM map in [0, 1] (0 outside the foreground);
    ``member_maps``: ``(M, X, Y)`` when asked for; ``score``: the ensemble map's mean in the
    model frame (the reference's image score); ``seeds``: the torch seed of each member.
    """

    index: int
    restoration: np.ndarray
    anomaly: np.ndarray
    member_maps: np.ndarray | None
    score: float
    seeds: list[int]
    pseudo_healthy: np.ndarray | None = None
    member_scores: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def seed(self) -> list[int]:
        """Alias of :attr:`seeds` (one per member)."""
        return list(self.seeds)


@dataclass
class RestoreResult:
    """A whole run: canonical ``(X, Y, Z)`` volumes plus scores, seeds, timings and settings.

    ``pseudo_healthy`` is in the scan's original intensity units and equals the input outside
    the restored slices' foreground; ``anomaly`` is 0 there. ``member_maps`` is ``(M, X, Y, Z)``
    when asked for. ``volume_score`` is the anomaly map's mean over the restored slices'
    foreground voxels. ``completed`` is False when the run was stopped early.
    """

    pseudo_healthy: np.ndarray
    anomaly: np.ndarray
    member_maps: np.ndarray | None
    slice_scores: dict[int, float]
    volume_score: float
    timings: dict[str, Any]
    seeds: dict[int, list[int]]
    settings: dict[str, Any]
    device: str
    members: list[str]
    restored: list[int]
    completed: bool = True


def _as_volume(volume: Volume | np.ndarray) -> Volume:
    return volume if isinstance(volume, Volume) else volume_from_array(np.asarray(volume))


def _as_ensemble(ensemble: Ensemble | str | Path) -> Ensemble:
    return ensemble if isinstance(ensemble, Ensemble) else Ensemble.from_dir(ensemble)


_META_DICTS = ("normalisation", "normalization", "preprocess", "preprocessing", "data")
_META_KEYS = {"norm": ("method", "norm"), "square": ("square",), "min_foreground": ("min_foreground",)}


def _recorded(info: dict[str, Any]) -> dict[str, Any]:
    """Preprocessing of one member: ``normalisation``/``preprocess``/``data`` dicts, else top level."""
    found: dict[str, Any] = {}
    sources = [info.get(k) for k in _META_DICTS] + [info]
    for key, names in _META_KEYS.items():
        for src in sources:
            if not isinstance(src, dict):
                continue
            names_here = names if src is not info else tuple(n for n in names if n != "method")
            values = [src.get(n) for n in names_here if src.get(n) is not None]
            if values and not isinstance(values[0], dict):
                found[key] = values[0]
                break
    return found


def _member_preprocessing(ensemble: Ensemble) -> dict[str, Any]:
    """Normalisation, squaring and minimum foreground recorded in the members' metadata.

    Trainers store them as ``normalisation = {"method", "square", "min_foreground", ...}``; the
    first member that records a value wins (a disagreement is logged).
    """
    found: dict[str, Any] = {}
    for member in ensemble.members:
        for key, value in _recorded(member.info).items():
            if key in found and found[key] != value:
                log.warning("ensemble members disagree on %s (%s vs %s)", key, found[key], value)
            found.setdefault(key, value)
    return found


def prepare_for(
    volume: Volume | np.ndarray,
    ensemble: Ensemble,
    settings: RestoreSettings | None = None,
    brain_mask: np.ndarray | None = None,
) -> PreparedScan:
    """The scan in the ensemble's model frame (its image size and recorded normalisation)."""
    settings = settings or RestoreSettings()
    meta = _member_preprocessing(ensemble)
    norm = settings.norm or meta.get("norm", "max")
    square = settings.square or meta.get("square", "pad")
    if norm not in ("max", "percentile"):
        log.warning("unknown normalisation %r in the ensemble metadata; using 'max'", norm)
        norm = "max"
    if square not in ("pad", "crop"):
        log.warning("unknown squaring %r in the ensemble metadata; using 'pad'", square)
        square = "pad"
    extra = {}
    min_fg = meta.get("min_foreground")
    if isinstance(min_fg, int | float) and not isinstance(min_fg, bool) and min_fg >= 0:
        extra["min_foreground"] = float(min_fg)
    return prepare_scan(
        _as_volume(volume),
        size=ensemble.image_size,
        brain_mask=brain_mask,
        norm=norm,
        square=square,
        **extra,
    )


def _slice_order(prepared: PreparedScan, slices: Iterable[int] | None) -> list[int]:
    """Canonical indices to restore, in priority order; slices without foreground are dropped."""
    n_z = prepared.volume.data.shape[2]
    if slices is None:
        return [int(k) for k in prepared.indices]
    wanted: list[int] = []
    for k in slices:
        k = int(k)
        if not 0 <= k < n_z:
            raise ScanError(prepared.volume.path, f"axial slice {k} is outside 0..{n_z - 1}")
        if k not in wanted:
            wanted.append(k)
    fg = set(prepared.indices.tolist())
    skipped = [k for k in wanted if k not in fg]
    if skipped:
        log.info("skipping %d axial slice(s) without foreground: %s", len(skipped), _ranges(skipped))
    return [k for k in wanted if k in fg]


def _ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    out, vals = [], sorted(values)
    start = prev = vals[0]
    for v in [*vals[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


@dataclass
class _Run:
    """Everything resolved once per run."""

    settings: RestoreSettings
    prepared: PreparedScan
    names: list[str]
    models: list[torch.nn.Module]
    device: torch.device
    t_start: int | None
    n_steps: int
    n_draws: int
    conditioned: bool
    schedule: Schedule


def _finish_batch(run: _Run, order: list[int], pos: np.ndarray, xs: list[torch.Tensor]) -> list[SliceResult]:
    """Member restorations of one batch -> maps, scores and slice-grid results."""
    prep, settings = run.prepared, run.settings
    rest = np.stack([from_model_range(x.float())[:, 0].cpu().numpy() for x in xs])  # (M, B, S, S)
    images, masks = prep.images[pos], prep.masks[pos]
    member_maps = np.stack([anomaly_map(r, images, masks, faithful=settings.faithful_ssim) for r in rest])
    ens = ensemble_map(member_maps, masks)
    scores = slice_scores(ens)
    member_scores = np.stack([slice_scores(m) for m in member_maps], axis=1)  # (B, M)
    geo = prep.geometry
    mean_rest = np.clip(geo.from_model(rest.mean(axis=0)), 0.0, 1.0)
    anomaly = np.clip(geo.from_model(ens), 0.0, 1.0)
    back_members = None
    if settings.keep_member_maps:
        m, b, s, _ = member_maps.shape
        back_members = np.clip(geo.from_model(member_maps.reshape(m * b, s, s)), 0.0, 1.0)
        back_members = back_members.reshape(m, b, *geo.in_shape)
    results = []
    for j, k in enumerate(order):
        fg = prep.foreground[:, :, k]
        restoration = np.where(fg, mean_rest[j], 0.0).astype(np.float32)
        pseudo = np.where(fg, prep.denormalise(restoration), prep.volume.data[:, :, k]).astype(np.float32)
        member = None if back_members is None else np.where(fg, back_members[:, j], 0.0).astype(np.float32)
        results.append(
            SliceResult(
                index=k,
                restoration=restoration,
                anomaly=np.where(fg, anomaly[j], 0.0).astype(np.float32),
                member_maps=member,
                score=float(scores[j]),
                seeds=[],
                pseudo_healthy=pseudo,
                member_scores=[float(s) for s in member_scores[j]],
            )
        )
    return results


def _start(
    volume: Volume | np.ndarray,
    ensemble: Ensemble | str | Path,
    settings: RestoreSettings | None,
    brain_mask: np.ndarray | None,
) -> _Run:
    settings = (settings or RestoreSettings()).validate()
    ensemble = _as_ensemble(ensemble)
    channels = ensemble.members[0].config.image_channels
    if channels != 1:
        raise SettingsError(f"the ensemble expects {channels}-channel images; scans are single-channel")
    prepared = prepare_for(volume, ensemble, settings, brain_mask)
    device = resolve_device(settings.device)
    autocast_dtype(device, settings.precision)  # fails early on an unsupported precision
    schedule = ensemble.schedule
    conditioned = ensemble.conditioned
    t_start = settings.t_start if settings.t_start is not None else (None if conditioned else DEFAULT_T_START)
    if t_start is not None and not 0 <= t_start < schedule.T:
        raise SettingsError(f"restore setting 't_start': must be in 0..{schedule.T - 1}, got {t_start}")
    n_steps = len(run_timesteps(settings, schedule, t_start))
    models = [compiled(m.model(device), settings.compile) for m in ensemble.members]
    return _Run(
        settings,
        prepared,
        ensemble.names,
        models,
        device,
        t_start,
        n_steps,
        noise_draws(settings.sampler, n_steps),
        conditioned,
        schedule,
    )


def restore_iter(
    volume: Volume | np.ndarray,
    ensemble: Ensemble | str | Path,
    settings: RestoreSettings | None = None,
    *,
    slices: Iterable[int] | None = None,
    brain_mask: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[Progress | SliceResult]:
    """Restore axial slices, yielding :class:`Progress` and :class:`SliceResult` items.

    ``slices`` (canonical axial indices) sets which slices and in what order (e.g. the one on
    screen first); default all foreground slices, bottom to top. Slices without foreground are
    skipped. ``should_stop()`` is checked between denoising steps: once it returns True nothing
    more is yielded (results already yielded stay valid). Problems with the scan, ensemble or
    settings raise before anything is yielded.
    """
    run = _start(volume, ensemble, settings, brain_mask)
    return _iterate(run, _slice_order(run.prepared, slices), should_stop or (lambda: False))


def _iterate(
    run: _Run, order: list[int], should_stop: Callable[[], bool]
) -> Iterator[Progress | SliceResult]:
    settings, prep = run.settings, run.prepared
    position = {int(k): j for j, k in enumerate(prep.indices)}
    size = prep.geometry.size
    batch_size = settings.batch_size or default_batch_size(run.device, size)
    total = len(order) * run.n_steps
    done_slices = 0
    yield Progress(
        0,
        total,
        f"restoring {len(order)} slice(s) with {len(run.models)} member(s) on {run.device}",
        0,
        len(order),
    )
    queue = list(order)
    while queue:
        if should_stop():
            return
        batch, queue = queue[:batch_size], queue[batch_size:]
        pos = np.array([position[k] for k in batch])
        label = ", ".join(str(k) for k in batch[:4]) + (" …" if len(batch) > 4 else "")
        started = time.perf_counter()
        xs: list[torch.Tensor] | None = None
        out_of_memory = False
        try:
            noise, seeds = _batch_noise(
                run.names, batch, settings.seed, run.n_draws, (1, size, size), run.device
            )
            cond = to_model_range(torch.from_numpy(prep.images[pos][:, None]).to(run.device))
            steps = _denoise_batch(
                run.models,
                cond,
                noise,
                settings,
                schedule=run.schedule,
                conditioned=run.conditioned,
                t_start=run.t_start,
                device=run.device,
            )
            for step, n_steps, step_xs in steps:
                xs = step_xs
                if should_stop():
                    return
                done = done_slices * run.n_steps + step * len(batch)
                msg = f"axial {label}: step {step}/{n_steps}"
                yield Progress(done, total, msg, done_slices, len(order))
                if should_stop():  # before the next step, not after it
                    return
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # outside the handler, so the traceback no longer holds the tensors
            noise = cond = xs = steps = None
            batch_size = _halve(batch, run.device)
            queue = batch + queue
            continue
        assert xs is not None
        results = _finish_batch(run, batch, pos, xs)
        seconds = (time.perf_counter() - started) / len(batch)
        for res, slice_seeds in zip(results, seeds, strict=True):
            if should_stop():
                return
            res.seeds, res.seconds = slice_seeds, seconds
            done_slices += 1
            yield res


def _halve(batch: list[int], device: torch.device) -> int:
    """The batch size to retry with after a CUDA out-of-memory (an error at one slice)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(batch) == 1:
        raise DeviceError(
            f"out of GPU memory on {device} even with one slice per batch: "
            "select fewer members, use precision fp16/bf16, or the CPU"
        )
    half = max(1, len(batch) // 2)
    log.warning("CUDA out of memory with %d slices per batch; retrying with %d", len(batch), half)
    return half


def restore_volume(
    volume: Volume | np.ndarray,
    ensemble: Ensemble | str | Path,
    settings: RestoreSettings | None = None,
    *,
    slices: Iterable[int] | None = None,
    brain_mask: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> RestoreResult:
    """Restore a scan (all foreground slices, or ``slices``) and collect a :class:`RestoreResult`.

    ``progress`` is called with every :class:`Progress` item; the other arguments are those of
    :func:`restore_iter`.
    """
    t0 = time.perf_counter()
    settings = (settings or RestoreSettings()).validate()
    run = _start(volume, ensemble, settings, brain_mask)
    prep = run.prepared
    order = _slice_order(prep, slices)
    pseudo = np.array(prep.volume.data, dtype=np.float32, copy=True)
    anomaly = np.zeros(prep.volume.data.shape, dtype=np.float32)
    members = None
    if settings.keep_member_maps:
        members = np.zeros((len(run.names), *prep.volume.data.shape), dtype=np.float32)
    scores: dict[int, float] = {}
    seeds: dict[int, list[int]] = {}
    per_slice: dict[int, float] = {}
    prepare_s = time.perf_counter() - t0
    for item in _iterate(run, order, should_stop or (lambda: False)):
        if isinstance(item, Progress):
            if progress is not None:
                progress(item)
            continue
        k = item.index
        pseudo[:, :, k] = item.pseudo_healthy
        anomaly[:, :, k] = item.anomaly
        if members is not None:
            members[:, :, :, k] = item.member_maps
        scores[k], seeds[k], per_slice[k] = item.score, item.seeds, item.seconds
    restored = list(scores)
    fg = np.zeros(prep.foreground.shape, dtype=bool)
    fg[:, :, restored] = prep.foreground[:, :, restored]
    total_s = time.perf_counter() - t0
    used = settings.to_dict()
    used.update(
        t_start=run.t_start,
        n_steps=run.n_steps,
        image_size=prep.geometry.size,
        norm=prep.norm.method,
        square=prep.geometry.square,
        autocast=str(autocast_dtype(run.device, settings.precision) or "float32").replace("torch.", ""),
    )
    return RestoreResult(
        pseudo_healthy=pseudo,
        anomaly=anomaly,
        member_maps=members,
        slice_scores=scores,
        volume_score=volume_score(anomaly, fg),
        timings={
            "total_s": total_s,
            "prepare_s": prepare_s,
            "per_slice_s": per_slice,
            "mean_per_slice_s": float(np.mean(list(per_slice.values()))) if per_slice else 0.0,
        },
        seeds=seeds,
        settings=used,
        device=str(run.device),
        members=list(run.names),
        restored=restored,
        completed=len(restored) == len(order),
    )
