"""From a test case to an :class:`~pseudohealthy.evaluation.pooling.EvalEntry`.

Owns which slices of a case are evaluated (its foreground slices, :func:`evenly_spaced` of them
for quick runs) and where its anomaly map comes from: a restoration found on disk
(:func:`pseudohealthy.evaluation.testsets.find_restoration`) is reused as it is; otherwise the
engine restores the chosen slices (:func:`restore_anomaly`) and a complete map is saved for
reuse (never over an existing file unless asked to). :func:`case_entries` yields the entries one
at a time, for :func:`pseudohealthy.evaluation.pooling.evaluate_maps`; a case that fails can be
reported and skipped (``on_error``) so that one bad scan does not stop a test set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from pseudohealthy.data.io import load_map, load_mask, load_scan, save_like
from pseudohealthy.data.preprocess import foreground_mask
from pseudohealthy.errors import PseudohealthyError, ScanError
from pseudohealthy.evaluation.pooling import EvalEntry, foreground_slices
from pseudohealthy.evaluation.testsets import ANOMALY_SUFFIX, Case, find_restoration

__all__ = ["case_entries", "evenly_spaced", "restore_anomaly", "saved_map_path"]


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


def _entry(
    case: Case,
    restorations: str | Path | None,
    load_ensemble: Callable[[], object] | None,
    settings: object | None,
    slices_per_volume: int | None,
    save_dir: str | Path | None,
    overwrite: bool,
) -> EvalEntry:
    volume = load_scan(case.scan)
    lesion = load_mask(case.mask, volume)
    brain = load_mask(case.brain_mask, volume) if case.brain_mask else None
    foreground = foreground_mask(volume.data, brain)
    every = foreground_slices(foreground)
    idx = evenly_spaced(every, slices_per_volume)
    found = find_restoration(case, restorations)
    info: dict = {"scan": str(case.scan), "mask": str(case.mask)}
    if found is not None:
        anomaly = load_map(found, volume)
        info["anomaly_source"] = str(found)
    elif load_ensemble is not None:
        anomaly = restore_anomaly(volume, load_ensemble(), settings, idx, brain)
        info["anomaly_source"] = "restored"
        if save_dir is not None and idx.size == every.size:
            info["anomaly_saved"] = str(_save_map(anomaly, volume, saved_map_path(save_dir, case), overwrite))
    else:
        where = f" in {restorations}" if restorations else ""
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
) -> Iterator[EvalEntry]:
    """Load each case and its anomaly map, one at a time, as :class:`EvalEntry`.

    Maps found in ``restorations`` (:func:`find_restoration`) are reused and nothing is
    restored; otherwise ``ensemble()`` (called once, lazily) restores the selected slices with
    ``settings``. Restored full volumes are written to ``save_dir`` as ``<name>_anomaly.nii.gz``
    (:func:`saved_map_path`; not when slices were subsampled, so a reused map is always
    complete), replacing an existing file only with ``overwrite``. With ``on_error``, a case
    that fails (a :class:`PseudohealthyError` or OSError) is passed to ``on_error(exc,
    case.name)`` and skipped; without, the error propagates.
    """
    loaded: list[object] = []

    def load_ensemble() -> object:
        if not loaded:
            loaded.append(ensemble())
        return loaded[0]

    for case in cases:
        try:
            entry = _entry(
                case,
                restorations,
                load_ensemble if ensemble is not None else None,
                settings,
                slices_per_volume,
                save_dir,
                overwrite,
            )
        except (PseudohealthyError, OSError) as exc:
            if on_error is None:
                raise
            on_error(exc, case.name)
            continue
        yield entry
