"""The scan-level engine: pseudo-healthy restorations and anomaly maps of a scan's axial slices.

Every foreground axial slice is brought into the model frame (:func:`prepare_for`: the
ensemble's image size and recorded normalisation), restored by every member
(:func:`~pseudohealthy.engine.frame.restore_frame_steps`, batched over slices, members in
lockstep), scored with 1 - SSIM in the model frame and mapped back to the slice's own grid.

- :func:`restore_iter` yields :class:`Progress` after every denoising step and a
  :class:`SliceResult` per slice as soon as its batch is done, in the order of ``slices``; its
  :class:`Restoration` keeps the run's :class:`~pseudohealthy.engine.record.RunRecord`.
- :func:`restore_volume` folds a whole run into a :class:`RestoreResult`.
- :func:`halving_batches` batches the slices and halves the batch on a CUDA out-of-memory: the
  one rule of this engine and of the evaluation's model frame.

Reproducibility: slice ``k`` of member ``m`` draws its noise from a generator seeded from
``(seed, k, member name)`` (:func:`~pseudohealthy.engine.sampler.slice_seed`), so a slice's result
does not depend on the batch size, the order, or which other slices and members run.
"""

from __future__ import annotations

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
from pseudohealthy.device import DeviceError, autocast_dtype, resolve_device
from pseudohealthy.engine.frame import FrameResult, compiled, default_batch_size, restore_frame_steps
from pseudohealthy.engine.record import RunRecord
from pseudohealthy.engine.sampler import SamplerPlan
from pseudohealthy.engine.settings import NORMS, SQUARES, RestoreSettings, SettingsError
from pseudohealthy.errors import ScanError
from pseudohealthy.model.checkpoint import Ensemble

__all__ = [
    "Progress",
    "Restoration",
    "RestoreResult",
    "SliceResult",
    "halving_batches",
    "prepare_for",
    "restore_iter",
    "restore_volume",
]

log = logging.getLogger(__name__)


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
    model frame (the reference's image score); ``seeds``: the torch seed of each member;
    ``uncertainty``: the members' disagreement (per-pixel standard deviation of their maps, 0
    outside the foreground) and ``uncertainty_score`` its mean in the model frame.
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
    uncertainty: np.ndarray | None = None
    uncertainty_score: float = 0.0


@dataclass
class RestoreResult:
    """A whole run: canonical ``(X, Y, Z)`` volumes and the run's :class:`RunRecord`.

    ``pseudo_healthy`` is in the scan's original intensity units and equals the input outside
    the restored slices' foreground; ``anomaly`` is 0 there. ``member_maps`` is ``(M, X, Y, Z)``
    when asked for; ``uncertainty`` is the members' disagreement (0 where nothing is restored).
    Scores, seeds, timings and settings are the record's.
    """

    pseudo_healthy: np.ndarray
    anomaly: np.ndarray
    member_maps: np.ndarray | None
    record: RunRecord
    uncertainty: np.ndarray | None = None

    @property
    def slice_scores(self) -> dict[int, float]:
        return self.record.slice_scores

    @property
    def volume_score(self) -> float | None:
        return self.record.volume_score

    @property
    def seeds(self) -> dict[int, list[int]]:
        return self.record.seeds

    @property
    def settings(self) -> dict[str, Any]:
        return self.record.settings

    @property
    def device(self) -> str:
        return self.record.device

    @property
    def members(self) -> list[str]:
        return self.record.member_names

    @property
    def restored(self) -> list[int]:
        return self.record.restored

    @property
    def completed(self) -> bool:
        return self.record.completed

    @property
    def timings(self) -> dict[str, Any]:
        """``total_s``, ``prepare_s``, ``per_slice_s`` (per slice) and ``mean_per_slice_s``."""
        per_slice = dict(self.record.seconds)
        mean = float(np.mean(list(per_slice.values()))) if per_slice else 0.0
        return {**self.record.timings, "per_slice_s": per_slice, "mean_per_slice_s": mean}


def _as_volume(volume: Volume | np.ndarray) -> Volume:
    return volume if isinstance(volume, Volume) else volume_from_array(np.asarray(volume))


def _as_ensemble(ensemble: Ensemble | str | Path) -> Ensemble:
    return ensemble if isinstance(ensemble, Ensemble) else Ensemble.from_dir(ensemble)


def _member_preprocessing(ensemble: Ensemble) -> dict[str, Any]:
    """The ``normalisation`` record the trainer writes (``method``, ``square``, ``min_foreground``,
    ``fov_mm``).

    The first member that records a value wins (a disagreement is logged).
    """
    found: dict[str, Any] = {}
    for member in ensemble.members:
        recorded = member.info.get("normalisation")
        if not isinstance(recorded, dict):
            continue
        for key in ("method", "square", "min_foreground", "fov_mm"):
            value = recorded.get(key)
            if value is None:
                continue
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
    norm = settings.norm or meta.get("method", NORMS[0])
    square = settings.square or meta.get("square", SQUARES[0])
    if norm not in NORMS:
        log.warning("unknown normalisation %r in the ensemble metadata; using %r", norm, NORMS[0])
        norm = NORMS[0]
    if square not in SQUARES:
        log.warning("unknown squaring %r in the ensemble metadata; using %r", square, SQUARES[0])
        square = SQUARES[0]
    extra = {}
    min_fg = meta.get("min_foreground")
    if isinstance(min_fg, int | float) and not isinstance(min_fg, bool) and min_fg >= 0:
        extra["min_foreground"] = float(min_fg)
    if meta.get("fov_mm") is not None:  # checked when the members were read (check_fov)
        extra["fov_mm"] = meta["fov_mm"]
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
    plan: SamplerPlan
    conditioned: bool
    ensemble: Ensemble

    def used_settings(self) -> dict[str, Any]:
        """The settings as run: the given ones plus what the run resolved."""
        autocast = autocast_dtype(self.device, self.settings.precision)
        return {
            **self.settings.to_dict(),
            "t_start": self.plan.t_start,
            "n_steps": self.plan.n_steps,
            "image_size": self.prepared.geometry.size,
            "norm": self.prepared.norm.method,
            "square": self.prepared.geometry.square,
            "autocast": str(autocast or "float32").replace("torch.", ""),
        }


def _slice_results(run: _Run, order: list[int], frame: FrameResult, seconds: float) -> list[SliceResult]:
    """A batch's model-frame result -> slice-grid results."""
    prep, geo = run.prepared, run.prepared.geometry
    mean_rest = np.clip(geo.from_model(frame.restorations.mean(axis=0)), 0.0, 1.0)
    anomaly = np.clip(geo.from_model(frame.maps), 0.0, 1.0)
    spread = np.clip(geo.from_model(frame.uncertainty), 0.0, 1.0)
    back_members = None
    if run.settings.keep_member_maps:
        m, b, s, _ = frame.member_maps.shape
        back_members = np.clip(geo.from_model(frame.member_maps.reshape(m * b, s, s)), 0.0, 1.0)
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
                score=float(frame.scores[j]),
                seeds=list(frame.seeds[j]),
                pseudo_healthy=pseudo,
                member_scores=[float(s) for s in frame.member_scores[j]],
                seconds=seconds,
                uncertainty=np.where(fg, spread[j], 0.0).astype(np.float32),
                uncertainty_score=float(frame.uncertainty_scores[j]),
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
    plan = settings.plan(ensemble.schedule, conditioned=ensemble.conditioned)
    prepared = prepare_for(volume, ensemble, settings, brain_mask)
    device = resolve_device(settings.device)
    autocast_dtype(device, settings.precision)  # fails early on an unsupported precision
    models = [compiled(m.model(device), settings.compile) for m in ensemble.members]
    return _Run(settings, prepared, ensemble.names, models, device, plan, ensemble.conditioned, ensemble)


class Restoration(Iterator[Progress | SliceResult]):
    """The items of one run (see :func:`restore_iter`); ``record`` grows with every slice."""

    def __init__(self, run: _Run, order: list[int], should_stop: Callable[[], bool]):
        self.prepared = run.prepared
        self.plan = run.plan
        self.order = order
        self.record = RunRecord.start(run.ensemble, run.used_settings(), str(run.device))
        self._items = _iterate(run, order, should_stop)

    def __next__(self) -> Progress | SliceResult:
        item = next(self._items)
        if isinstance(item, SliceResult):
            self.record.add(item)
            self.record.completed = len(self.record.slice_scores) >= len(self.order)
        return item

    def close(self) -> None:
        self._items.close()


def restore_iter(
    volume: Volume | np.ndarray,
    ensemble: Ensemble | str | Path,
    settings: RestoreSettings | None = None,
    *,
    slices: Iterable[int] | None = None,
    brain_mask: np.ndarray | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Restoration:
    """Restore axial slices, yielding :class:`Progress` and :class:`SliceResult` items.

    ``slices`` (canonical axial indices) sets which slices and in what order (e.g. the one on
    screen first); default all foreground slices, bottom to top. Slices without foreground are
    skipped. ``should_stop()`` is checked between denoising steps: once it returns True nothing
    more is yielded (results already yielded stay valid). Problems with the scan, ensemble or
    settings raise before anything is yielded.
    """
    run = _start(volume, ensemble, settings, brain_mask)
    return Restoration(run, _slice_order(run.prepared, slices), should_stop or (lambda: False))


def _batch_steps(run: _Run, batch: list[int]) -> Iterator[int | FrameResult]:
    prep = run.prepared
    pos = np.searchsorted(prep.indices, batch)
    return restore_frame_steps(
        run.models,
        run.names,
        prep.images[pos],
        prep.masks[pos],
        batch,
        run.plan,
        run.ensemble.schedule,
        seed=run.settings.seed,
        conditioned=run.conditioned,
        device=run.device,
        precision=run.settings.precision,
        faithful_ssim=run.settings.faithful_ssim,
    )


def _iterate(
    run: _Run, order: list[int], should_stop: Callable[[], bool]
) -> Iterator[Progress | SliceResult]:
    n_steps = run.plan.n_steps
    batch_size = run.settings.batch_size or default_batch_size(run.device, run.prepared.geometry.size)
    total = len(order) * n_steps
    done_slices = 0
    message = f"restoring {len(order)} slice(s) with {len(run.models)} member(s) on {run.device}"
    yield Progress(0, total, message, 0, len(order))
    started = time.perf_counter()

    def steps(batch: list[int]) -> Iterator[int | FrameResult]:
        nonlocal started
        started = time.perf_counter()  # a batch retried after an out-of-memory: from the retry
        return _batch_steps(run, batch)

    if should_stop():
        return
    for batch, item in halving_batches(order, batch_size, run.device, steps):
        if isinstance(item, FrameResult):
            seconds = (time.perf_counter() - started) / len(batch)
            for res in _slice_results(run, batch, item, seconds):
                if should_stop():
                    return
                done_slices += 1
                yield res
            if should_stop():  # before the next batch starts
                return
            continue
        if should_stop():
            return
        label = ", ".join(str(k) for k in batch[:4]) + (" …" if len(batch) > 4 else "")
        done = done_slices * n_steps + item * len(batch)
        yield Progress(done, total, f"axial {label}: step {item}/{n_steps}", done_slices, len(order))
        if should_stop():  # before the next step, not after it
            return


def halving_batches(
    order: Sequence[int],
    batch_size: int,
    device: torch.device,
    steps: Callable[[list[int]], Iterable[int | FrameResult]],
) -> Iterator[tuple[list[int], int | FrameResult]]:
    """``(batch, item)`` for every item of ``steps(batch)`` (step numbers, then one
    :class:`~pseudohealthy.engine.frame.FrameResult`), ``order`` taken ``batch_size`` slices at a
    time. A CUDA out-of-memory in a batch retries it, and every later batch, with half as many
    slices (a :class:`~pseudohealthy.device.DeviceError` at one slice); the retried batch's items
    start again. The one out-of-memory rule of every restoration (the engine's, the model frame's)."""
    queue = list(order)
    while queue:
        batch, queue = queue[:batch_size], queue[batch_size:]
        out_of_memory = False
        try:
            for item in steps(batch):
                yield batch, item
                if isinstance(item, FrameResult):
                    break
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        if out_of_memory:  # outside the handler, so no traceback holds the tensors
            batch_size = _halve(batch, device)
            queue = batch + queue


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
    """Restore a scan (all foreground slices, or ``slices``): :func:`restore_iter` folded into a
    :class:`RestoreResult`. ``progress`` is called with every :class:`Progress` item."""
    t0 = time.perf_counter()
    restoration = restore_iter(
        volume, ensemble, settings, slices=slices, brain_mask=brain_mask, should_stop=should_stop
    )
    prep, record = restoration.prepared, restoration.record
    shape = prep.volume.data.shape
    pseudo = np.array(prep.volume.data, dtype=np.float32, copy=True)
    anomaly = np.zeros(shape, dtype=np.float32)
    spread = np.zeros(shape, dtype=np.float32)
    keep_members = bool(record.settings.get("keep_member_maps"))
    members = np.zeros((len(record.members), *shape), dtype=np.float32) if keep_members else None
    prepare_s = time.perf_counter() - t0
    for item in restoration:
        if isinstance(item, Progress):
            if progress is not None:
                progress(item)
            continue
        k = item.index
        pseudo[:, :, k] = item.pseudo_healthy
        anomaly[:, :, k] = item.anomaly
        spread[:, :, k] = item.uncertainty
        if members is not None:
            members[:, :, :, k] = item.member_maps
    record.completed = len(record.restored) == len(restoration.order)
    record.timings = {"total_s": time.perf_counter() - t0, "prepare_s": prepare_s}
    return RestoreResult(pseudo, anomaly, members, record, spread)
