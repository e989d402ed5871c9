"""Anomaly maps: 1 - SSIM between restoration and input, ensemble means, slice and volume scores.

SSIM uses scikit-image's ``structural_similarity`` with ``gaussian_weights=True, sigma=1.5,
use_sample_covariance=False`` (Wang et al. 2004). scikit-image truncates that Gaussian at
3.5 sigma, radius ``int(3.5 * 1.5 + 0.5) = 5``: an 11-tap window, as in the reference. Local
statistics at the border use **zero padding**, as the reference's convolution does: each slice
is padded with :data:`PAD` zeros before scikit-image's (reflecting) filter and cropped after, so
the map covers the whole slice. Computed in float64 (float32 loses ~3e-5 to cancellation in the variances):
about 1.2 ms per 128x128 slice on one CPU core, so no vectorised re-implementation is needed.

The default constants are the reference's (:data:`~pseudohealthy.engine.defaults.FAITHFUL_SSIM`,
data range 255 on [0, 1] images: ``benchmarks/bench_ssim.py`` chose them): maps are then small
(of order 1e-3), so every display takes its range from the map
(:func:`pseudohealthy.figures.ranges.display_range`), never [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from skimage.metrics import structural_similarity

from pseudohealthy.engine.defaults import FAITHFUL_SSIM

__all__ = [
    "DATA_RANGE",
    "FAITHFUL_DATA_RANGE",
    "PAD",
    "SIGMA",
    "WIN_SIZE",
    "anomaly_map",
    "ensemble_map",
    "foreground_mean",
    "member_disagreement",
    "slice_scores",
    "volume_score",
]

SIGMA = 1.5
WIN_SIZE = 2 * int(3.5 * SIGMA + 0.5) + 1  # 11: scikit-image's window for gaussian_weights
PAD = (WIN_SIZE - 1) // 2  # zeros around each slice: the reference's zero-padded convolution
DATA_RANGE = 1.0  # images in [0, 1]: C1 = (0.01)^2, C2 = (0.03)^2
FAITHFUL_DATA_RANGE = 255.0  # the reference release's max_val on [0, 1] images


def _as_stack(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name}: expected (H, W) or (N, H, W), got shape {arr.shape}")
    return arr[None] if arr.ndim == 2 else arr


def anomaly_map(
    restoration: np.ndarray,
    image: np.ndarray,
    foreground: np.ndarray | None,
    *,
    faithful: bool = FAITHFUL_SSIM,
) -> np.ndarray:
    """``clamp(1 - SSIM(restoration, image), 0, 1)`` per pixel, 0 outside the foreground.

    ``restoration`` and ``image`` are (H, W) or (N, H, W) float arrays in [0, 1] (each slice is
    compared on its own; CPU torch tensors work too). ``foreground`` is a bool array of that
    shape; ``None`` uses ``image > 0``, the reference's rule.

    ``faithful=True`` (the default, :data:`~pseudohealthy.engine.defaults.FAITHFUL_SSIM`)
    reproduces the reference release, which passes ``max_val=255`` on [0, 1] images:
    ``data_range=255`` gives C1 = 6.5 and C2 = 58.5, far larger than any local (co)variance of a
    [0, 1] image: SSIM stays close to 1 and the map is about ``(mean_r - mean_i)^2 / C1 +
    var(r - i) / C2`` in local Gaussian windows, i.e. a smoothed squared error (at most ~0.13,
    usually of order 1e-3; rankings, and so AP, still work). ``faithful=False`` uses
    ``data_range=1`` (C1 = 0.01^2, C2 = 0.03^2), textbook SSIM of [0, 1] images, whose maps
    span [0, 1] and respond to texture as well as intensity. Returns float32 of the input shape.
    """
    single = np.ndim(image) == 2
    rest = _as_stack(restoration, "restoration").astype(np.float64, copy=False)
    img = _as_stack(image, "image").astype(np.float64, copy=False)
    if rest.shape != img.shape:
        raise ValueError(f"restoration shape {rest.shape} differs from image shape {img.shape}")
    if min(img.shape[1:]) < WIN_SIZE:
        raise ValueError(f"slices of {img.shape[1:]} are smaller than the {WIN_SIZE}-pixel SSIM window")
    fg = img > 0 if foreground is None else _as_stack(foreground, "foreground").astype(bool, copy=False)
    if fg.shape != img.shape:
        raise ValueError(f"foreground shape {fg.shape} differs from image shape {img.shape}")
    data_range = FAITHFUL_DATA_RANGE if faithful else DATA_RANGE
    out = np.empty(img.shape, dtype=np.float32)
    for k in range(img.shape[0]):
        _, ssim = structural_similarity(
            np.pad(rest[k], PAD),
            np.pad(img[k], PAD),
            gaussian_weights=True,
            sigma=SIGMA,
            use_sample_covariance=False,
            data_range=data_range,
            full=True,
        )
        out[k] = np.clip(1.0 - ssim[PAD:-PAD, PAD:-PAD], 0.0, 1.0)
    out[~fg] = 0.0
    return out[0] if single else out


def ensemble_map(member_maps: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
    """Mean of the members' maps (axis 0), re-zeroed outside ``foreground`` (when given)."""
    maps = np.asarray(member_maps, dtype=np.float32)
    if maps.ndim < 3 or maps.shape[0] == 0:
        raise ValueError(f"member_maps: expected (M, H, W) or (M, N, H, W) with M >= 1, got {maps.shape}")
    out = maps.mean(axis=0, dtype=np.float64).astype(np.float32)
    if foreground is not None:
        fg = np.asarray(foreground, dtype=bool)
        if fg.shape != out.shape:
            raise ValueError(f"foreground shape {fg.shape} differs from map shape {out.shape}")
        out[~fg] = 0.0
    return out


def member_disagreement(member_maps: np.ndarray, foreground: np.ndarray | None = None) -> np.ndarray:
    """The ensemble's uncertainty: the per-pixel standard deviation of the member maps ``(M, ...)``
    (0 for a single member, and outside ``foreground``)."""
    stack = np.asarray(member_maps, dtype=np.float32)
    if stack.ndim < 2:
        raise ValueError(f"member maps must be (M, ...), got shape {stack.shape}")
    out = stack.std(axis=0).astype(np.float32)
    if foreground is not None:
        out[~np.asarray(foreground, dtype=bool)] = 0.0
    return out


def slice_scores(maps: np.ndarray) -> np.ndarray:
    """Image score of each slice: the mean of its map over all pixels (as the reference). (N,)."""
    stack = _as_stack(maps, "maps")
    return stack.reshape(stack.shape[0], -1).mean(axis=1, dtype=np.float64)


def volume_score(scores: Iterable[float]) -> float | None:
    """The volume score of a run: the mean of its restored slices' scores (:func:`slice_scores`).

    The one definition, used by ``restore.json``, the viewer and the run record alike; None when
    no slice is restored.
    """
    values = [float(s) for s in scores]
    return float(np.mean(values, dtype=np.float64)) if values else None


def format_score(value: float) -> str:
    """A slice or volume score for people: three significant digits, so that the small scores of
    a faithful ensemble (1e-4) do not print as 0.0000."""
    return f"{value:.3g}"


def foreground_mean(maps: np.ndarray, foreground: np.ndarray | None = None) -> float:
    """Mean of ``maps`` over the ``foreground`` voxels (all voxels when None; 0 if empty)."""
    maps = np.asarray(maps)
    if foreground is None:
        return float(maps.mean(dtype=np.float64)) if maps.size else 0.0
    fg = np.asarray(foreground, dtype=bool)
    if fg.shape != maps.shape:
        raise ValueError(f"foreground shape {fg.shape} differs from map shape {maps.shape}")
    return float(maps[fg].mean(dtype=np.float64)) if fg.any() else 0.0
