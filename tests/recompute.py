"""Independent recomputations for the benchmark tests: reported numbers are checked against these.

Nothing here calls the benchmarks' or the library's evaluation code: scans and maps are read with
nibabel, slices framed with scikit-image's ``resize`` by the documented rules (centre-pad to a
square, linear, anti-aliased when shrinking, masks ``> 0.4``), SSIM is scikit-image's and the
metrics are scikit-learn's.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from skimage.metrics import structural_similarity
from skimage.transform import resize
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

MASK_THRESHOLD = 0.4  # REFERENCE.md, "Benchmark metrics": masks resized, then > 0.4
STORED_MASK = 0.5  # a voxel of a mask file is in above 0.5 (DESIGN.md: load_mask), e.g. resampled masks
SSIM_SIGMA = 1.5  # REFERENCE.md, "Inference and maps": Gaussian window 11, sigma 1.5
PERCENTILES = (1.0, 99.0)  # REFERENCE.md, the intensity baseline: clipped to the 1st-99th percentile


def canonical(path: str | Path) -> np.ndarray:
    """A NIfTI volume in the closest canonical (RAS+) orientation, float64."""
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).get_fdata(), dtype=np.float64)


def mask(path: str | Path) -> np.ndarray:
    """A mask file, canonical, bool (voxels above :data:`STORED_MASK`)."""
    return canonical(path) > STORED_MASK


def padded_frame(volume: np.ndarray, indices, size: int) -> np.ndarray:
    """Axial slices ``indices`` of ``volume`` (X, Y, Z), centre-padded with 0 to a square and
    resized linearly to ``size x size`` (anti-aliased when shrinking): ``(N, size, size)``."""
    stack = np.asarray(volume, dtype=np.float64)[:, :, list(indices)]
    h, w = stack.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, stack.shape[2]))
    oy, ox = (side - h) // 2, (side - w) // 2
    square[oy : oy + h, ox : ox + w] = stack
    out = resize(square, (size, size, stack.shape[2]), order=1, mode="edge", anti_aliasing=size < side)
    return np.moveaxis(out, -1, 0)


def intensity_scores(image: np.ndarray, foreground: np.ndarray, *, invert: bool = False) -> np.ndarray:
    """Meissen et al.'s baseline: intensity clipped to the foreground's 1st-99th percentile, scaled
    to [0, 1] (``1 - x`` when ``invert``), 0 outside the foreground."""
    lo, hi = np.percentile(image[foreground], PERCENTILES)
    scaled = (np.clip(image, lo, hi) - lo) / (hi - lo)
    return np.where(foreground, 1.0 - scaled if invert else scaled, 0.0)


def pixel_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pooled pixel AP and the best Dice over the PR curve's thresholds (scikit-learn)."""
    y, s = np.ravel(labels).astype(bool), np.ravel(scores)
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"ap_pixel": float(average_precision_score(y, s)), "best_dice": float(dice.max())}


def slice_metrics(maps: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Slice AP and AUROC: slice score = map mean, label = any lesion pixel (None: one class)."""
    scores = maps.reshape(len(maps), -1).mean(axis=1)
    y = labels.reshape(len(labels), -1).any(axis=1)
    if y.all() or not y.any():
        return {"ap_image": None, "auroc": None}
    return {"ap_image": float(average_precision_score(y, scores)), "auroc": float(roc_auc_score(y, scores))}


def ssim_map(
    restoration: np.ndarray, image: np.ndarray, foreground: np.ndarray, data_range: float
) -> np.ndarray:
    """``clip(1 - SSIM, 0, 1)`` per pixel of (N, S, S) stacks, 0 outside ``foreground``; float32,
    the maps' stored precision (float64 maps break float32 ties and move AP by ~1e-6)."""
    out = np.empty(image.shape, dtype=np.float32)
    for k in range(len(image)):
        _, full = structural_similarity(  # zero padding by the window radius (5), as the reference
            np.pad(restoration[k].astype(np.float64), 5),
            np.pad(image[k].astype(np.float64), 5),
            gaussian_weights=True,
            sigma=SSIM_SIGMA,
            use_sample_covariance=False,
            data_range=data_range,
            full=True,
        )
        out[k] = np.clip(1.0 - full[5:-5, 5:-5], 0.0, 1.0)
    return np.where(foreground, out, np.float32(0.0))


def assert_close(reported: dict, expected: dict, tol: float, what: str) -> None:
    """Every key of ``expected`` matches ``reported`` within ``tol`` (None must stay None)."""
    for key, value in expected.items():
        got = reported[key]
        if value is None or got is None:
            assert got is value, (what, key, got, value)
        else:
            assert abs(got - value) <= tol, (what, key, got, value)
