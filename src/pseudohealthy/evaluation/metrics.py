"""Benchmark metrics (Lagogiannis et al.), pooled over the whole test set, never per volume.

- ``ap_image`` / ``auroc``: slice score vs slice label (1 if the slice has any lesion pixel).
- ``ap_pixel``: precision-recall AP over all pixels of all test slices, background included
  (the step-wise sum ``sum_k (R_k - R_{k-1}) P_k``, as scikit-learn's
  ``average_precision_score``).
- ``best_dice``: the best Dice over all thresholds of that pooled curve (one global threshold),
  ``max 2PR / (P + R) = max 2TP / (TP + FP + #positives)``.
- ``dice_at_5fpr``: Dice at the largest operating point whose pixel false-positive rate is
  <= 5% (pixels with score >= t). The reference code thresholds ``> t`` at that point, i.e.
  one distinct score level higher; the difference is negligible for continuous maps.

Pixels are pooled memory-efficiently in :class:`PixelPool`: exact (sorted) below
``exact_limit`` pixels, otherwise a histogram over float32 scores in [0, 1] whose bins are the
float32 bit patterns with the 8 lowest mantissa bits dropped: log-spaced bins with a relative
width of 2^-15 (about 3e-5) and exact ordering between bins; scores below 2^-24 count as 0.
Scores outside [0, 1] are clipped in the histogram (arrays given to :func:`benchmark_metrics`
are first mapped into [0, 1] by a monotone affine map, which changes no metric).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pseudohealthy.errors import PseudohealthyError

__all__ = [
    "EXACT_LIMIT",
    "MAX_FPR",
    "Curve",
    "MetricsError",
    "PixelPool",
    "benchmark_metrics",
    "binary_curve",
    "intensity_baseline_scores",
    "metrics_from_pool",
    "pr_curve",
    "roc_curve",
]

EXACT_LIMIT = 2_000_000  # pixels pooled exactly (sorted) before switching to the histogram
MAX_FPR = 0.05
_SHIFT = 8  # float32 mantissa bits dropped by the histogram
_LO_KEY = int(np.array(2.0**-24, dtype=np.float32).view(np.int32)) >> _SHIFT
_HI_KEY = int(np.array(1.0, dtype=np.float32).view(np.int32)) >> _SHIFT
N_BINS = _HI_KEY - _LO_KEY + 2  # bin 0 holds scores below 2^-24


class MetricsError(PseudohealthyError, ValueError):
    """Metrics cannot be computed from the given scores and labels."""


@dataclass(frozen=True)
class Curve:
    """Operating points at distinct thresholds, highest first: predicted = score >= threshold."""

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray

    @property
    def n_pos(self) -> int:
        return int(self.tps[-1]) if self.tps.size else 0

    @property
    def n_neg(self) -> int:
        return int(self.fps[-1]) if self.fps.size else 0

    def _check(self, need_neg: bool = False) -> None:
        if self.n_pos == 0:
            raise MetricsError("no positive labels: precision-recall metrics are undefined")
        if need_neg and self.n_neg == 0:
            raise MetricsError("no negative labels: false-positive rates are undefined")

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        self._check()
        return self.tps / (self.tps + self.fps), self.tps / self.n_pos

    def average_precision(self) -> float:
        precision, recall = self.precision_recall()
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))

    def dice(self) -> np.ndarray:
        self._check()
        return 2.0 * self.tps / (self.tps + self.fps + self.n_pos)

    def best_dice(self) -> tuple[float, float]:
        """(best Dice, its threshold)."""
        dice = self.dice()
        k = int(np.argmax(dice))
        return float(dice[k]), float(self.thresholds[k])

    def dice_at_fpr(self, max_fpr: float = MAX_FPR) -> tuple[float, float]:
        """(Dice, threshold) at the largest operating point with FPR <= ``max_fpr``.

        When even the highest threshold exceeds ``max_fpr``, nothing is predicted: Dice 0, inf.
        """
        self._check(need_neg=True)
        k = int(np.searchsorted(self.fps / self.n_neg, max_fpr, side="right")) - 1
        if k < 0:
            return 0.0, float("inf")
        return float(self.dice()[k]), float(self.thresholds[k])

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) with the (0, 0) point first."""
        self._check(need_neg=True)
        fpr = np.concatenate([[0.0], self.fps / self.n_neg])
        tpr = np.concatenate([[0.0], self.tps / self.n_pos])
        return fpr, tpr

    def auroc(self) -> float:
        fpr, tpr = self.roc()
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _check_pair(scores: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise MetricsError(
            f"{what}: {scores.size} scores {scores.shape} but {labels.size} labels {labels.shape}"
        )
    if scores.size and not np.all(np.isfinite(scores)):
        raise MetricsError(f"{what}: scores contain NaN or Inf")
    return scores.ravel(), labels.ravel().astype(bool)


def binary_curve(scores: np.ndarray, labels: np.ndarray) -> Curve:
    """Exact curve by sorting (like scikit-learn's ``_binary_clf_curve``)."""
    scores, labels = _check_pair(scores, labels, "binary_curve")
    if scores.size == 0:
        raise MetricsError("binary_curve: no scores")
    order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    tps = np.cumsum(labels[order], dtype=np.int64)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    return Curve(s[last].astype(np.float64), tps[last], last + 1 - tps[last])


def _bin_keys(scores: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(scores, dtype=np.float32), 0.0, 1.0)
    keys = (s.view(np.int32) >> _SHIFT).astype(np.int64) - (_LO_KEY - 1)
    return np.maximum(keys, 0)


def _bin_edges(keys: np.ndarray) -> np.ndarray:
    """Lower edge (float) of histogram bins ``keys``; bin 0 -> 0."""
    bits = ((keys + (_LO_KEY - 1)) << _SHIFT).astype(np.int32)
    return np.where(keys > 0, bits.view(np.float32).astype(np.float64), 0.0)


class PixelPool:
    """Accumulates (score, label) pixels slice by slice; exact until ``exact_limit`` pixels."""

    def __init__(self, exact_limit: int = EXACT_LIMIT) -> None:
        self.exact_limit = int(exact_limit)
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._pos: np.ndarray | None = None  # histogram counts once switched
        self._neg: np.ndarray | None = None
        self.n = 0
        self.n_clipped = 0  # scores outside [0, 1] (histogram mode clips them)

    @property
    def exact(self) -> bool:
        return self._pos is None

    def update(self, scores: np.ndarray, labels: np.ndarray) -> None:
        scores, labels = _check_pair(scores, labels, "PixelPool.update")
        self.n_clipped += int(np.count_nonzero((scores < 0) | (scores > 1)))
        self.n += scores.size
        if self.exact and self.n <= self.exact_limit:
            self._scores.append(np.array(scores, copy=True))
            self._labels.append(labels.copy())
            return
        if self.exact:
            self._pos = np.zeros(N_BINS, dtype=np.int64)
            self._neg = np.zeros(N_BINS, dtype=np.int64)
            for s, lab in zip(self._scores, self._labels, strict=True):
                self._add(s, lab)
            self._scores, self._labels = [], []
        self._add(scores, labels)

    def _add(self, scores: np.ndarray, labels: np.ndarray) -> None:
        keys = _bin_keys(scores)
        pos = np.bincount(keys[labels], minlength=N_BINS)
        self._pos += pos
        self._neg += np.bincount(keys, minlength=N_BINS) - pos

    def curve(self) -> Curve:
        if self.n == 0:
            raise MetricsError("no pixels were pooled")
        if self.exact:
            return binary_curve(np.concatenate(self._scores), np.concatenate(self._labels))
        keys = np.flatnonzero((self._pos + self._neg) > 0)[::-1]
        return Curve(_bin_edges(keys), np.cumsum(self._pos[keys]), np.cumsum(self._neg[keys]))


def _unit_range(scores: np.ndarray) -> np.ndarray:
    """Monotone affine map into [0, 1] when scores leave it (no metric changes)."""
    lo, hi = float(scores.min()), float(scores.max())
    if lo >= 0.0 and hi <= 1.0:
        return scores
    return (scores - lo) / (hi - lo) if hi > lo else np.zeros_like(scores, dtype=np.float32)


def pixel_pool(scores: np.ndarray, labels: np.ndarray, exact_limit: int = EXACT_LIMIT) -> PixelPool:
    """A :class:`PixelPool` holding ``scores`` / ``labels`` (any shape)."""
    scores, labels = _check_pair(scores, labels, "pixels")
    pool = PixelPool(exact_limit)
    if scores.size:
        pool.update(_unit_range(scores.astype(np.float64, copy=False)), labels)
    return pool


def _slice_metrics(scores: np.ndarray, labels: np.ndarray, allow_undefined: bool) -> dict:
    scores, labels = _check_pair(scores, labels, "slices")
    if scores.size == 0:
        raise MetricsError("no slices")
    n_pos = int(labels.sum())
    out: dict[str, float | None] = {"ap_image": None, "auroc": None}
    if 0 < n_pos < labels.size:
        curve = binary_curve(scores, labels)
        out["ap_image"] = curve.average_precision()
        out["auroc"] = curve.auroc()
    elif not allow_undefined:
        kind = "no" if n_pos == 0 else "every"
        raise MetricsError(
            f"{kind} slice of {labels.size} contains lesion: slice-level AP and AUROC are undefined"
        )
    return out


def metrics_from_pool(
    slice_scores: np.ndarray,
    slice_labels: np.ndarray,
    pool: PixelPool,
    *,
    n_volumes: int | None = None,
    max_fpr: float = MAX_FPR,
    allow_undefined: bool = False,
) -> dict:
    """:func:`benchmark_metrics` with the pixels already in a :class:`PixelPool`."""
    out = _slice_metrics(slice_scores, slice_labels, allow_undefined)
    curve = pool.curve()
    if curve.n_pos == 0:
        raise MetricsError(f"no lesion pixel among {pool.n} pooled pixels: pixel metrics are undefined")
    if curve.n_neg == 0:
        raise MetricsError(f"every one of {pool.n} pooled pixels is lesion: pixel metrics are undefined")
    out["ap_pixel"] = curve.average_precision()
    out["best_dice"], out["best_dice_threshold"] = curve.best_dice()
    out["dice_at_5fpr"], out["threshold_at_5fpr"] = curve.dice_at_fpr(max_fpr)
    out["n_slices"] = int(np.size(slice_scores))
    out["n_lesion_slices"] = int(np.count_nonzero(slice_labels))
    out["n_pixels"] = int(pool.n)
    out["n_lesion_pixels"] = curve.n_pos
    out["n_volumes"] = None if n_volumes is None else int(n_volumes)
    out["pixel_pooling"] = "exact" if pool.exact else "histogram"
    return out


def benchmark_metrics(
    slice_scores: np.ndarray,
    slice_labels: np.ndarray,
    pixel_scores: np.ndarray,
    pixel_labels: np.ndarray,
    *,
    n_volumes: int | None = None,
    max_fpr: float = MAX_FPR,
    allow_undefined: bool = False,
    exact_limit: int = EXACT_LIMIT,
) -> dict:
    """The benchmark's metrics pooled over all given slices and pixels.

    Returns ``ap_image, auroc, ap_pixel, best_dice, dice_at_5fpr, n_slices, n_volumes`` and
    extras (thresholds, counts, pooling mode). Raises :class:`MetricsError` on mismatched
    lengths, NaN scores, or no lesion (or no healthy) pixel. Slice-level metrics need both
    lesion and lesion-free slices: otherwise an error, or ``None`` with ``allow_undefined``.
    """
    pool = pixel_pool(pixel_scores, pixel_labels, exact_limit)
    return metrics_from_pool(
        slice_scores,
        slice_labels,
        pool,
        n_volumes=n_volumes,
        max_fpr=max_fpr,
        allow_undefined=allow_undefined,
    )


def pr_curve(
    scores: np.ndarray | PixelPool, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) at every distinct threshold, highest threshold first."""
    curve = scores.curve() if isinstance(scores, PixelPool) else binary_curve(scores, labels)
    return curve.precision_recall()


def roc_curve(
    scores: np.ndarray | PixelPool, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) up to (1, 1)."""
    curve = scores.curve() if isinstance(scores, PixelPool) else binary_curve(scores, labels)
    return curve.roc()


def intensity_baseline_scores(
    image: np.ndarray,
    foreground: np.ndarray,
    *,
    percentiles: tuple[float, float] = (1.0, 99.0),
    invert: bool = False,
) -> np.ndarray:
    """Meissen et al.'s baseline: the intensity itself as the anomaly score.

    Clipped to the foreground's 1st-99th percentile, scaled to [0, 1], 0 outside the
    foreground; ``invert`` scores dark voxels (``1 - x``, for hypointense lesions, e.g. T1).
    """
    image = np.asarray(image, dtype=np.float32)
    fg = np.asarray(foreground, dtype=bool)
    if fg.shape != image.shape:
        raise ValueError(f"foreground shape {fg.shape} differs from image shape {image.shape}")
    out = np.zeros(image.shape, dtype=np.float32)
    if not fg.any():
        return out
    lo, hi = (float(v) for v in np.percentile(image[fg], percentiles))
    scaled = (np.clip(image, lo, hi) - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    if invert:
        scaled = 1.0 - scaled
    out[fg] = scaled[fg]
    return out
