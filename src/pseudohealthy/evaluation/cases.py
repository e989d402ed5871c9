"""From a test case to an :class:`~pseudohealthy.evaluation.pooling.EvalEntry`.

Owns which slices of a case are evaluated (those the frame's rules score,
:func:`~pseudohealthy.evaluation.frame.evaluated_slices`, :func:`evenly_spaced` of them for quick
runs) and where its anomaly map comes from. In the model frame (the reference's) the case is
restored in the model frame (:func:`restore_model_frame`) and scored there. In the native frame
a restoration found on disk (:func:`pseudohealthy.evaluation.testsets.find_restoration`) is
reused as it is; otherwise the engine restores the chosen slices (:func:`restore_anomaly`).
A complete restored map is saved in the scan's grid for reuse (never over an existing file
unless asked to). :func:`case_entries` yields the entries one
at a time, for :func:`pseudohealthy.evaluation.pooling.evaluate_maps`; a case that fails can be
reported and skipped (``on_error``) so that one bad scan does not stop a test set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pseudohealthy.data.io import load_map, load_mask, load_scan, save_like
from pseudohealthy.data.preprocess import foreground_mask
from pseudohealthy.errors import PseudohealthyError, ScanError
from pseudohealthy.evaluation.frame import (
    FrameRestoration,
    FrameRules,
    evaluated_slices,
    frame_slices,
    resolve_rules,
    restore_frames,
)
from pseudohealthy.evaluation.pooling import EvalEntry
from pseudohealthy.evaluation.testsets import ANOMALY_SUFFIX, Case, find_restoration

__all__ = ["case_entries", "evenly_spaced", "restore_anomaly", "restore_model_frame", "saved_map_path"]


def evenly_spaced(indices: np.ndarray, n: int | None) -> np.ndarray:
    """``n`` evenly spaced entries of ``indices`` (all when ``n`` is None or large enough)."""
    indices = np.asarray(indices)
    if n is None or n >= indices.size:
        return indices
    return indices[np.unique(np.round(np.linspace(0, indices.size - 1, n)).astype(int))]


def restore_anomaly(
    volume, ensemble, settings, slices: np.ndarray, brain_mask: np.ndarray | None
) -> np.ndarray:
    """The engine's canonical anomaly map for ``slices`` (a hook the tests replace)."""
    from pseudohealthy.engine.restore import restore_volume

    return np.asarray(
        restore_volume(
            volume, ensemble, settings, slices=[int(k) for k in slices], brain_mask=brain_mask
        ).anomaly
    )


def restore_model_frame(
    volume, ensemble, settings, slices: np.ndarray, brain_mask: np.ndarray | None
) -> FrameRestoration:
    """The ensemble's model-frame restoration of ``slices`` (a hook the tests replace)."""
    return restore_frames(volume, ensemble, settings, slices=slices, brain_mask=brain_mask)


def saved_map_path(save_dir: str | Path, case: Case) -> Path:
    """Where :func:`case_entries` saves the restored map of ``case``: ``<name>_anomaly.nii.gz``."""
    return Path(save_dir) / f"{case.name}{ANOMALY_SUFFIX}"


def _save_map(anomaly: np.ndarray, volume, path: Path, overwrite: bool) -> Path:
    """Save a restored map; a failed write is ``cannot write <path>: <reason>`` (OSError as cause)."""
    try:
        return save_like(anomaly, volume, path, overwrite=overwrite)
    except ScanError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError):
            raise PseudohealthyError(f"cannot write {path}: {cause.strerror or cause}") from cause
        raise


@dataclass
class _Job:
    """What every case of a run shares."""

    restorations: str | Path | None
    load_ensemble: Callable[[], object] | None
    settings: object | None
    slices_per_volume: int | None
    save_dir: str | Path | None
    overwrite: bool
    rules: FrameRules


def _model_entry(case: Case, job: _Job, volume, lesion, brain, foreground, every, idx) -> EvalEntry:
    if job.load_ensemble is None:
        raise PseudohealthyError(f"{case.name}: the model frame needs an ensemble to restore with")
    restored = restore_model_frame(volume, job.load_ensemble(), job.settings, idx, brain)
    anomaly = restored.native_map(job.rules.foreground)
    info: dict = {"scan": str(case.scan), "mask": str(case.mask), "anomaly_source": "restored"}
    if job.save_dir is not None and idx.size == every.size:
        path = saved_map_path(job.save_dir, case)
        info["anomaly_saved"] = str(_save_map(anomaly, volume, path, job.overwrite))
    framed = frame_slices(restored, lesion, job.rules, idx)
    return EvalEntry(case.name, anomaly, lesion, foreground, volume.data, idx, info, framed=framed)


def _entry(case: Case, job: _Job) -> EvalEntry:
    volume = load_scan(case.scan)
    lesion = load_mask(case.mask, volume)
    brain = load_mask(case.brain_mask, volume) if case.brain_mask else None
    foreground = foreground_mask(volume.data, brain)
    every = evaluated_slices(foreground, job.rules)
    idx = evenly_spaced(every, job.slices_per_volume)
    if job.rules.frame == "model":
        return _model_entry(case, job, volume, lesion, brain, foreground, every, idx)
    found = find_restoration(case, job.restorations)
    info: dict = {"scan": str(case.scan), "mask": str(case.mask)}
    if found is not None:
        anomaly = load_map(found, volume)
        info["anomaly_source"] = str(found)
    elif job.load_ensemble is not None:
        anomaly = restore_anomaly(volume, job.load_ensemble(), job.settings, idx, brain)
        info["anomaly_source"] = "restored"
        if job.save_dir is not None and idx.size == every.size:
            path = saved_map_path(job.save_dir, case)
            info["anomaly_saved"] = str(_save_map(anomaly, volume, path, job.overwrite))
    else:
        where = f" in {job.restorations}" if job.restorations else ""
        raise PseudohealthyError(
            f"{case.name}: no {case.name}{ANOMALY_SUFFIX}{where} and no ensemble to restore with"
        )
    return EvalEntry(case.name, anomaly, lesion, foreground, volume.data, idx, info)


def case_entries(
    cases: Iterable[Case],
    *,
    restorations: str | Path | None = None,
    ensemble: Callable[[], object] | None = None,
    settings: object | None = None,
    slices_per_volume: int | None = None,
    save_dir: str | Path | None = None,
    overwrite: bool = False,
    on_error: Callable[[BaseException, str], None] | None = None,
    rules: FrameRules | None = None,
) -> Iterator[EvalEntry]:
    """Load each case and its anomaly map, one at a time, as :class:`EvalEntry`.

    ``rules`` (None: :func:`~pseudohealthy.evaluation.frame.resolve_rules`, the model frame with
    an ensemble and no ``restorations``, else the native frame) set the frame. In the model
    frame every case is restored there with ``ensemble()`` (called once, lazily). In the native
    frame, maps found in ``restorations`` (:func:`find_restoration`) are reused and nothing is
    restored; otherwise ``ensemble()`` restores the selected slices with ``settings``.
    Restored full volumes are written to ``save_dir`` as ``<name>_anomaly.nii.gz`` in the scan's
    grid (:func:`saved_map_path`; not when slices were subsampled, so a reused map is always
    complete), replacing an existing file only with ``overwrite``. With ``on_error``, a case
    that fails (a :class:`PseudohealthyError` or OSError) is passed to ``on_error(exc,
    case.name)`` and skipped; without, the error propagates.
    """
    loaded: list[object] = []

    def load_ensemble() -> object:
        if not loaded:
            loaded.append(ensemble())
        return loaded[0]

    rules = rules or resolve_rules(reused=restorations is not None or ensemble is None)
    job = _Job(
        restorations,
        load_ensemble if ensemble is not None else None,
        settings,
        slices_per_volume,
        save_dir,
        overwrite,
        rules,
    )
    for case in cases:
        try:
            entry = _entry(case, job)
        except (PseudohealthyError, OSError) as exc:
            if on_error is None:
                raise
            on_error(exc, case.name)
            continue
        yield entry
