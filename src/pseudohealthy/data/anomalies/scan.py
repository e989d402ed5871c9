"""Corrupt the slices of a whole prepared scan and map the result back to its grid."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .corrupt import apply_task
from .folds import task_index
from .poisson import Sources
from .rng import keyed_rng
from .style import DEFAULT_STYLE

__all__ = ["ScanCorruption", "corrupt_scan", "intra_sources_for", "pick_positions"]


@dataclass
class ScanCorruption:
    """One task applied to slices of a prepared scan.

    ``positions`` index ``prepared.indices``; ``corrupted`` and ``masks`` hold the
    model-frame slices (all of the scan's foreground slices; untouched ones unchanged).
    ``volume`` (original intensity units) and ``mask_volume`` are canonical, on the scan's grid.
    """

    task: int
    positions: np.ndarray
    corrupted: np.ndarray
    masks: np.ndarray
    volume: np.ndarray
    mask_volume: np.ndarray


def pick_positions(n: int, count: int | None) -> np.ndarray:
    """``count`` evenly spaced positions of ``n`` (all when ``count`` is None or >= n)."""
    if count is None or count >= n:
        return np.arange(n)
    if count < 1:
        raise ValueError(f"the number of slices must be at least 1, got {count}")
    return np.unique(np.linspace(0, n - 1, count).round().astype(int))


def intra_sources_for(
    images: np.ndarray, indices: np.ndarray, position: int, *, min_gap: int = 10
) -> Callable[[np.random.Generator], np.ndarray]:
    """Draw another slice of the same scan at least ``min_gap`` axial slices away.

    Falls back to the farthest half of the other slices when none is that far, and to the
    left-right mirror of the slice itself when it is the only one.
    """
    distance = np.abs(np.asarray(indices) - indices[position])
    candidates = np.flatnonzero(distance >= min_gap)
    if candidates.size == 0:
        others = np.flatnonzero(distance > 0)
        if others.size == 0:
            mirror = np.ascontiguousarray(images[position][::-1])
            return lambda rng: mirror
        order = others[np.argsort(-distance[others], kind="stable")]
        candidates = order[: max(1, order.size // 2)]
    return lambda rng: images[candidates[rng.integers(candidates.size)]]


def corrupt_scan(
    prepared,
    task: int | str,
    *,
    seed: int = 0,
    positions: Iterable[int] | None = None,
    inter_sources: Sources | None = None,
    min_gap: int = 10,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    style: str = DEFAULT_STYLE,
) -> ScanCorruption:
    """Apply one anomaly of ``task`` to slices of a :class:`~pseudohealthy.data.preprocess.PreparedScan`.

    Slice ``k`` (canonical axial index) uses the stream ``keyed_rng(seed, task, k)``, so a
    slice's anomaly does not depend on which other slices are chosen. The change is mapped
    back to the scan's grid (linear); the native mask is where the resampled mask is >= 0.5
    and only there does the written volume differ from the scan, within the scan's range.
    ``style``: the tasks' details (:data:`~pseudohealthy.data.anomalies.STYLES`).
    """
    index = task_index(task)
    images = np.asarray(prepared.images, dtype=np.float32)
    masks_fg = np.asarray(prepared.masks, dtype=bool)
    indices = np.asarray(prepared.indices)
    chosen = np.arange(len(indices)) if positions is None else np.asarray(list(positions), dtype=int)
    corrupted = images.copy()
    masks = np.zeros(images.shape, dtype=bool)
    loop = chosen if progress is None else progress(chosen)
    for j in loop:
        if not masks_fg[j].any():
            continue
        rng = keyed_rng(seed, index, int(indices[j]))
        corrupted[j], masks[j] = apply_task(
            index,
            images[j],
            masks_fg[j],
            rng,
            intra_sources=intra_sources_for(images, indices, int(j), min_gap=min_gap),
            inter_sources=inter_sources,
            style=style,
        )
    delta = prepared.to_volume(corrupted - images)
    native_mask = prepared.to_volume(masks.astype(np.float32)) >= 0.5
    data = prepared.volume.data
    out = np.array(data, dtype=np.float32, copy=True)
    norm = np.asarray(prepared.normalised, dtype=np.float32)[native_mask]
    moved = np.clip(norm + delta[native_mask], 0.0, 1.0)
    change = prepared.denormalise(moved) - prepared.denormalise(norm)
    out[native_mask] = np.clip(data[native_mask] + change, float(data.min()), float(data.max()))
    return ScanCorruption(index, chosen, corrupted, masks, out, native_mask)
