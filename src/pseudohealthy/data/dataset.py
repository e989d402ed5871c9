"""Training data: healthy slices in memory, corrupted on the fly with the fold's synthetic tasks.

- :func:`find_scans` finds NIfTI scans (files or folders, skipping masks) and DICOM series
  folders;
  :func:`collect_training_scans` adds each scan's optional brain mask.
- :class:`HealthySlices` loads every scan once into model-frame slices and splits them into
  training and held-out slices by volume.
- :class:`CorruptedSliceDataset` corrupts training slices with the fold's 3 training tasks;
  sample ``i`` of epoch ``e`` uses its own random stream (seed, epoch, slice), so results do
  not depend on the number of data-loader workers.
- :func:`build_validation` corrupts the held-out slices once with the fold's 2 validation tasks.
- :class:`EpochBatchSampler` gives the batches of every step from (seed, epoch) alone, so a
  resumed run sees the batches an uninterrupted one would have, sharded over DDP ranks.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pseudohealthy.data.anomalies import DEFAULT_STYLE, Corruptor, keyed_rng, sample_rng, task_indices
from pseudohealthy.data.io import (
    is_dicom_folder,
    is_dicom_source,
    is_nifti_name,
    load_mask,
    load_scan,
    scan_name,
)
from pseudohealthy.data.preprocess import NORMS, prepare_scan
from pseudohealthy.errors import PseudohealthyError, ScanError

__all__ = [
    "MASK_WORDS",
    "CorruptedSliceDataset",
    "EpochBatchSampler",
    "HealthySlices",
    "ValidationSet",
    "build_validation",
    "collect_training_scans",
    "companion_path",
    "find_scans",
    "split_holdout",
]

log = logging.getLogger(__name__)

MASK_WORDS = ("mask", "seg", "label", "otmulticlass")  # file names skipped when searching folders
AUTO_BRAIN_MASKS = ("{stem}_brainmask.nii.gz", "{stem}_brainmask.nii", "brainmask.nii.gz", "brainmask.nii")
_SPLIT_KEY, _VAL_KEY, _SAMPLER_KEY, _GAMMA_KEY = 11, 12, 13, 14  # keyed_rng stream names


def _looks_like_mask(path: Path) -> bool:
    name = path.name.lower()
    return any(word in name for word in MASK_WORDS)


def _matches(path: Path, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(path.name, p) or fnmatch.fnmatch(str(path), p) for p in patterns)


def companion_path(scan: Path, pattern: str) -> Path:
    """The file named by ``pattern`` for ``scan``: ``{stem}`` (name without .nii/.nii.gz) and
    ``{name}`` are filled in; a relative result lies beside the scan."""
    try:
        filled = pattern.format(stem=scan_name(scan), name=scan.name)
    except (KeyError, IndexError, ValueError) as exc:
        raise PseudohealthyError(f"bad file pattern {pattern!r}: use {{stem}} or {{name}} ({exc})") from None
    path = Path(filled)
    return path if path.is_absolute() else scan.parent / path


def _brain_mask_for(scan: Path, pattern: str | None) -> Path | None:
    if pattern is not None and pattern.strip().lower() in ("", "none"):
        return None
    if pattern is None:  # automatic: a sibling brain mask when there is one
        for candidate in AUTO_BRAIN_MASKS:
            path = companion_path(scan, candidate)
            if path.is_file() and path != scan:
                return path
        return None
    path = companion_path(scan, pattern)
    if not path.is_file():
        raise ScanError(path, f"brain mask for {scan.name} not found (pattern {pattern!r})")
    return path


def find_scans(
    paths: Iterable[str | Path], *, exclude: Sequence[str] = (), include: Sequence[str] = ()
) -> list[Path]:
    """Every NIfTI file given or found under given folders, resolved, each once, in order.

    Folders are searched recursively for ``*.nii`` / ``*.nii.gz`` (:func:`is_nifti_name`),
    skipping names that look like masks (:data:`MASK_WORDS`), and for subfolders holding a DICOM
    series; a folder that holds a DICOM series (or ``folder::SERIES``) is one scan. ``exclude`` /
    ``include`` are glob patterns on the file name or path.
    Raises :class:`ScanError` when a path is missing or no scan is found.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if is_dicom_folder(path) or (not path.exists() and is_dicom_source(path)):
            files = [path]  # one DICOM series (``folder::SERIES`` chooses one of several)
        elif path.is_dir():
            files = _scans_under(path)
        elif path.is_file():
            files = [path]
        else:
            raise ScanError(path, "not found")
        files = [p for p in files if not _matches(p, exclude)]
        if include:
            files = [p for p in files if _matches(p, include)]
        found.extend(files)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        given = ", ".join(str(p) for p in paths) or "(nothing)"
        raise ScanError(None, f"no NIfTI scans found in {given} (nor DICOM series)")
    return unique


def _scans_under(folder: Path) -> list[Path]:
    """NIfTI files under ``folder`` (recursively, sorted, skipping masks), then the subfolders
    that hold a DICOM series (each one scan)."""
    entries = sorted(folder.rglob("*"))
    files = [p for p in entries if p.is_file() and is_nifti_name(p) and not _looks_like_mask(p)]
    return files + [p for p in entries if p.is_dir() and not p.name.startswith(".") and is_dicom_folder(p)]


def collect_training_scans(
    paths: Iterable[str | Path],
    brain_mask_pattern: str | None = None,
    *,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
) -> list[tuple[Path, Path | None]]:
    """``(scan, brain mask or None)`` for every scan :func:`find_scans` finds in ``paths``.

    Brain masks: ``brain_mask_pattern`` such as ``"{stem}_brainmask.nii.gz"`` (required for
    every scan), ``None`` for a sibling ``brainmask.nii.gz`` or ``{stem}_brainmask.nii.gz`` when
    present, ``"none"`` for no masks. Raises :class:`ScanError` when a path is missing, no scan is
    found or a required brain mask is missing.
    """
    scans = find_scans(paths, exclude=exclude, include=include)
    return [(p, _brain_mask_for(p, brain_mask_pattern)) for p in scans]


def split_holdout(volume_ids: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held-out)`` slice positions, split by volume (deterministic from ``seed``).

    With two or more volumes, whole volumes are held out (in a seeded random order) until at
    least ``val_fraction`` of the slices are, always keeping one volume for training; with
    one volume, ``val_fraction`` of its slices (at least one) are held out.
    """
    ids = np.asarray(volume_ids)
    n = ids.size
    if not 0.0 <= val_fraction < 1.0:
        raise PseudohealthyError(f"the held-out fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0 or n < 2:
        return np.arange(n), np.arange(0)
    rng = keyed_rng(seed, _SPLIT_KEY)
    volumes = np.unique(ids)
    if volumes.size >= 2:
        need = math.ceil(val_fraction * n)
        held: list[int] = []
        for v in rng.permutation(volumes):
            if len(held) == volumes.size - 1 or int(np.isin(ids, held).sum()) >= need:
                break
            held.append(int(v))
        is_val = np.isin(ids, held)
    else:
        is_val = np.zeros(n, dtype=bool)
        is_val[rng.choice(n, max(1, round(val_fraction * n)), replace=False)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


SliceFilter = Callable[[str, int, np.ndarray], bool]


@dataclass
class HealthySlices:
    """Foreground axial slices of several scans in the model frame, with a held-out split.

    ``images`` (N, S, S) float32 in [0, 1]; ``masks`` their foregrounds; ``volume_ids`` and
    ``slice_indices`` (canonical axial index) say where each came from; ``train_index`` and
    ``val_index`` are positions into these arrays.
    """

    images: np.ndarray
    masks: np.ndarray
    volume_ids: np.ndarray
    slice_indices: np.ndarray
    files: list[str]
    size: int
    norm: str = NORMS[0]
    square: str = "pad"
    min_foreground: float = 0.01
    fov_mm: float | None = None
    brain_masks: list[str | None] = field(default_factory=list)
    lesion_masks: list[str | None] = field(default_factory=list)
    n_excluded: int = 0
    train_index: np.ndarray = field(default_factory=lambda: np.arange(0))
    val_index: np.ndarray = field(default_factory=lambda: np.arange(0))

    @classmethod
    def from_scans(
        cls,
        scans: Sequence[tuple[str | Path, str | Path | None]],
        *,
        size: int = 128,
        norm: str = NORMS[0],
        square: str = "pad",
        min_foreground: float = 0.01,
        exclude_masks: Sequence[str | Path | None] | None = None,
        slice_filter: SliceFilter | None = None,
        val_fraction: float = 0.05,
        seed: int = 0,
        progress: bool = False,
    ) -> HealthySlices:
        """Load each ``(scan, brain mask)`` once and keep its foreground slices.

        ``exclude_masks`` (one lesion mask or None per scan) drops every axial slice where the
        mask has a lesion voxel (training on the lesion-free slices of patients);
        ``slice_filter(scan name, axial index, image) -> keep`` drops more.
        """
        from tqdm import tqdm

        if exclude_masks is not None and len(exclude_masks) != len(scans):
            raise PseudohealthyError(f"{len(exclude_masks)} lesion masks for {len(scans)} scans")
        images, masks, vols, idxs = [], [], [], []
        files, brains, lesions = [], [], []
        excluded, fovs = 0, []
        for v, (scan, brain) in enumerate(
            tqdm(scans, desc="loading scans", unit="scan", disable=not progress)
        ):
            volume = load_scan(scan)
            brain_mask = load_mask(brain, volume) if brain is not None else None
            prepared = prepare_scan(
                volume,
                size=size,
                brain_mask=brain_mask,
                norm=norm,
                square=square,
                min_foreground=min_foreground,
            )
            fovs.append(prepared.geometry.side * float(np.mean(volume.spacing[:2])))
            keep = np.ones(len(prepared.indices), dtype=bool)
            lesion = None if exclude_masks is None else exclude_masks[v]
            if lesion is not None:
                has_lesion = load_mask(lesion, volume).any(axis=(0, 1))
                keep &= ~has_lesion[prepared.indices]
            if slice_filter is not None:
                for j, k in enumerate(prepared.indices):
                    keep[j] &= bool(slice_filter(volume.name, int(k), prepared.images[j]))
            excluded += int((~keep).sum())
            files.append(str(scan))
            brains.append(None if brain is None else str(brain))
            lesions.append(None if lesion is None else str(lesion))
            if not keep.any():
                log.warning("%s: no slice left after excluding lesion slices", scan)
                continue
            images.append(prepared.images[keep])
            masks.append(prepared.masks[keep])
            vols.append(np.full(int(keep.sum()), v, dtype=np.int32))
            idxs.append(prepared.indices[keep].astype(np.int32))
        if not images:
            raise PseudohealthyError("no training slices: every slice was excluded")
        data = cls(
            images=np.concatenate(images).astype(np.float32, copy=False),
            masks=np.concatenate(masks),
            volume_ids=np.concatenate(vols),
            slice_indices=np.concatenate(idxs),
            files=files,
            size=int(size),
            norm=norm,
            square=square,
            min_foreground=float(min_foreground),
            fov_mm=round(float(np.median(fovs)), 3),
            brain_masks=brains,
            lesion_masks=lesions,
            n_excluded=excluded,
        )
        data.split(val_fraction, seed)
        return data

    def split(self, val_fraction: float = 0.05, seed: int = 0) -> None:
        """Set ``train_index`` / ``val_index`` with :func:`split_holdout`."""
        self.train_index, self.val_index = split_holdout(self.volume_ids, val_fraction, seed)
        if self.train_index.size == 0:
            raise PseudohealthyError("no training slices left after the held-out split")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_volumes(self) -> int:
        return int(np.unique(self.volume_ids).size)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: files, slice and volume counts, the split."""
        held = sorted({int(v) for v in self.volume_ids[self.val_index]})
        return {
            "files": list(self.files),
            "brain_masks": list(self.brain_masks),
            "lesion_masks": list(self.lesion_masks),
            "n_slices": len(self),
            "n_volumes": self.n_volumes,
            "n_train_slices": int(self.train_index.size),
            "n_val_slices": int(self.val_index.size),
            "held_out_volumes": [self.files[v] for v in held] if self.n_volumes > 1 else [],
            "n_excluded_slices": int(self.n_excluded),
        }

    def normalisation(self) -> dict[str, Any]:
        """The preprocessing a restoration must repeat."""
        return {
            "method": self.norm,
            "square": self.square,
            "size": self.size,
            "min_foreground": self.min_foreground,
            "fov_mm": self.fov_mm,
        }


def _other_slice_source(images: np.ndarray, pool: np.ndarray, own: int | None) -> Callable:
    """``rng -> image``: a random slice of ``pool`` other than position ``own``.

    ``own=None``: any slice of the pool. A pool of one slice gives that slice's mirror image.
    """
    if pool.size < 2:
        mirror = np.ascontiguousarray(images[pool[0]][::-1])
        return lambda rng: mirror
    if own is None:
        return lambda rng: images[pool[int(rng.integers(pool.size))]]

    def draw(rng: np.random.Generator) -> np.ndarray:
        j = int(rng.integers(pool.size - 1))
        return images[pool[j + (j >= own)]]

    return draw


class CorruptedSliceDataset(Dataset):
    """Training slices corrupted on the fly: item -> ``dict(x0, cond, mask, task, index)``.

    ``x0`` the clean slice and ``cond`` its corrupted version, (1, S, S) float32 in [0, 1];
    ``mask`` (1, S, S) bool the anomaly; ``task`` the task index (-1: left clean, ``p_none``).
    Keys are positions ``i`` (epoch from :meth:`set_epoch`) or ``(epoch, i)`` pairs; the
    random stream is ``sample_rng(seed, slice, epoch)``, the same in any worker. ``style``: the
    tasks' details (:data:`~pseudohealthy.data.anomalies.STYLES`). ``gamma``: intensity
    augmentation, the half-width ``a`` of a log-uniform gamma: ``x0`` and ``cond`` are both raised
    to ``exp(U(-a, a))`` (0 and 1 stay; 0: none), drawn from a stream of its own so the
    corruptions are those of an unaugmented run.
    """

    def __init__(
        self,
        data: HealthySlices,
        indices: Sequence[int] | np.ndarray,
        tasks: Iterable[int | str],
        *,
        seed: int = 0,
        p_none: float = 0.2,
        inter_sources: Sequence[np.ndarray] | None = None,
        max_anomalies: int = 4,
        style: str = DEFAULT_STYLE,
        gamma: float = 0.0,
    ) -> None:
        self.images = data.images
        self.masks = data.masks
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size == 0:
            raise PseudohealthyError("no slices to train on")
        self.tasks = task_indices(tasks)
        self.seed = int(seed)
        self.gamma = float(gamma)
        self.epoch = 0
        self.corruptor = Corruptor(
            self.tasks, p_none=p_none, max_anomalies=max_anomalies, inter_sources=inter_sources, style=style
        )

    def set_epoch(self, epoch: int) -> None:
        """The epoch used for integer keys."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, pos = (int(key[0]), int(key[1])) if isinstance(key, tuple | list) else (self.epoch, int(key))
        if not 0 <= pos < len(self):
            raise IndexError(pos)
        index = int(self.indices[pos])
        rng = sample_rng(self.seed, index, epoch)
        image, fg = self.images[index], self.masks[index]
        intra = _other_slice_source(self.images, self.indices, pos)
        if fg.any():
            cond, mask, task = self.corruptor(image, fg, rng, intra_sources=intra)
        else:
            cond, mask, task = image.copy(), np.zeros(image.shape, dtype=bool), -1
        if self.gamma > 0:
            draw = keyed_rng(self.seed, _GAMMA_KEY, index, epoch).uniform(-self.gamma, self.gamma)
            power = float(np.exp(draw))
            image, cond = np.power(image, power), np.power(cond, power)
        return {
            "x0": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None],
            "cond": torch.from_numpy(np.ascontiguousarray(cond, dtype=np.float32))[None],
            "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
            "task": int(task),
            "index": index,
        }


@dataclass
class ValidationSet:
    """Held-out slices corrupted once: ``x0``, ``cond`` (M, S, S) float32, ``mask`` and ``fg`` bool."""

    x0: np.ndarray
    cond: np.ndarray
    mask: np.ndarray
    fg: np.ndarray
    task: np.ndarray
    indices: np.ndarray
    tasks: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.x0.shape[0])


def build_validation(
    data: HealthySlices,
    indices: Sequence[int] | np.ndarray,
    tasks: Iterable[int | str],
    *,
    seed: int = 0,
    p_none: float = 0.2,
    inter_sources: Sequence[np.ndarray] | None = None,
    max_slices: int | None = None,
    progress: bool = False,
    style: str = DEFAULT_STYLE,
) -> ValidationSet:
    """Corrupt held-out slices once (deterministic from ``seed``) with ``tasks``.

    At most ``max_slices`` evenly spaced slices are kept. Intra-set sources are the other
    held-out slices (the training slices when only one is held out). ``style``: the tasks' details
    (:data:`~pseudohealthy.data.anomalies.STYLES`).
    """
    from tqdm import tqdm

    idx = np.asarray(indices, dtype=np.int64)
    if max_slices is not None and idx.size > max_slices:
        idx = idx[np.unique(np.linspace(0, idx.size - 1, max_slices).round().astype(int))]
    tasks = task_indices(tasks)
    corruptor = Corruptor(tasks, p_none=p_none, inter_sources=inter_sources, style=style)
    own_pool = idx.size >= 2
    pool = idx if own_pool else np.asarray(data.train_index, dtype=np.int64)
    s = data.size
    cond = np.empty((idx.size, s, s), dtype=np.float32)
    mask = np.zeros((idx.size, s, s), dtype=bool)
    task = np.full(idx.size, -1, dtype=np.int64)
    for j in tqdm(range(idx.size), desc="validation set", unit="slice", disable=not progress, leave=False):
        i = int(idx[j])
        fg = data.masks[i]
        cond[j] = data.images[i]
        if not fg.any():
            continue
        intra = _other_slice_source(data.images, pool, j if own_pool else None)
        cond[j], mask[j], task[j] = corruptor(
            data.images[i], fg, keyed_rng(seed, _VAL_KEY, i), intra_sources=intra
        )
    return ValidationSet(data.images[idx].copy(), cond, mask, data.masks[idx].copy(), task, idx, tasks)


class EpochBatchSampler(Sampler):
    """Endless batches of ``(epoch, position)`` keys, starting at step ``start_step``.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; each step takes the next
    ``batch_size * world_size`` positions (the last incomplete batch of an epoch is dropped)
    and rank ``r`` keeps every ``world_size``-th of them from ``r``: the DistributedSampler
    split, without state, so resuming at any step reproduces the uninterrupted batches.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        start_step: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError("need at least one sample and a positive batch size")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start_step, self.rank, self.world_size = int(start_step), int(rank), int(world_size)
        self.global_batch = self.batch_size * self.world_size
        self.steps_per_epoch = max(1, self.n // self.global_batch)

    def permutation(self, epoch: int) -> np.ndarray:
        perm = keyed_rng(self.seed, _SAMPLER_KEY, epoch).permutation(self.n)
        need = self.global_batch * self.steps_per_epoch
        return np.resize(perm, need) if perm.size < need else perm

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The keys of this rank's batch at global step ``step`` (0-based)."""
        epoch, b = divmod(step, self.steps_per_epoch)
        chunk = self.permutation(epoch)[b * self.global_batch : (b + 1) * self.global_batch]
        return [(epoch, int(i)) for i in chunk[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        epoch, perm = -1, None
        while True:
            e, b = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, perm = e, self.permutation(e)
            chunk = perm[b * self.global_batch : (b + 1) * self.global_batch]
            yield [(epoch, int(i)) for i in chunk[self.rank :: self.world_size]]
            step += 1
