"""Fidelity of a restoration on scans with lesion masks, in the evaluation frame.

Healthy brain = the frame's foreground minus the lesion. Reported per case and pooled over the
set (sums over pixels, so the pooled value is the pixel-weighted one, not a mean of cases):

- ``ssim_healthy``: the restoration's SSIM against the input, both in [0, 1] in the reference's
  max-normalised scale (:data:`~pseudohealthy.evaluation.frame.FIDELITY_NORM`; the model's own
  scale for members trained with it, the default), scikit-image ``structural_similarity`` with
  ``data_range=1`` and the maps' window (Gaussian, sigma 1.5, population covariance), its
  per-pixel map averaged over healthy brain;
- ``psnr_healthy``: ``10 log10(1 / MSE)`` over healthy brain (dB; None when the MSE is 0);
- ``bias_healthy``: the mean of restoration - input over healthy brain (negative: the
  restoration is darker than the patient; same scale);
- ``map_mean_healthy`` / ``map_mean_lesion``: the scored anomaly map's mean in healthy brain and
  inside the lesion, and ``map_ratio`` = lesion / healthy (None when either is undefined).

SSIM and PSNR need the restoration (None for maps read from disk).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.metrics import structural_similarity

from pseudohealthy.engine.maps import SIGMA
from pseudohealthy.evaluation.frame import FramedSlices

__all__ = ["FIDELITY_KEYS", "Fidelity", "ssim_map"]

FIDELITY_KEYS = (
    "ssim_healthy",
    "psnr_healthy",
    "bias_healthy",
    "map_mean_healthy",
    "map_mean_lesion",
    "map_ratio",
)


def ssim_map(restoration: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of one (H, W) slice pair in [0, 1] (``data_range=1``), float64."""
    _, full = structural_similarity(
        np.asarray(restoration, dtype=np.float64),
        np.asarray(image, dtype=np.float64),
        gaussian_weights=True,
        sigma=SIGMA,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
    )
    return full


@dataclass
class Fidelity:
    """Pixel sums of the fidelity measures; :meth:`add` slices, :meth:`merge` cases."""

    n_healthy: int = 0
    n_lesion: int = 0
    map_healthy: float = 0.0
    map_lesion: float = 0.0
    n_compared: int = 0  # healthy pixels with a restoration
    ssim_sum: float = 0.0
    squared_error: float = 0.0
    error: float = 0.0  # signed: restoration - input

    def add(self, framed: FramedSlices) -> Fidelity:
        """Add a volume's framed slices; returns self."""
        lesion = np.asarray(framed.lesion, dtype=bool)
        healthy = np.asarray(framed.foreground, dtype=bool) & ~lesion
        maps = np.asarray(framed.maps, dtype=np.float64)
        self.n_healthy += int(healthy.sum())
        self.n_lesion += int(lesion.sum())
        self.map_healthy += float(maps[healthy].sum())
        self.map_lesion += float(maps[lesion].sum())
        if framed.images is None or framed.restorations is None:
            return self
        for j in np.flatnonzero(healthy.any(axis=(1, 2))):
            inside = healthy[j]
            rest = framed.restorations[j].astype(np.float64)
            img = framed.images[j].astype(np.float64)
            self.n_compared += int(inside.sum())
            self.ssim_sum += float(ssim_map(rest, img)[inside].sum())
            diff = (rest - img)[inside]
            self.squared_error += float((diff**2).sum())
            self.error += float(diff.sum())
        return self

    def merge(self, other: Fidelity) -> Fidelity:
        """The sums of both; returns self."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def result(self) -> dict[str, float | None]:
        """The measures of :data:`FIDELITY_KEYS` (None where undefined)."""
        healthy = self.map_healthy / self.n_healthy if self.n_healthy else None
        lesion = self.map_lesion / self.n_lesion if self.n_lesion else None
        ratio = lesion / healthy if lesion is not None and healthy else None
        ssim = psnr = bias = None
        if self.n_compared:
            ssim = self.ssim_sum / self.n_compared
            bias = self.error / self.n_compared
            mse = self.squared_error / self.n_compared
            psnr = float(10.0 * np.log10(1.0 / mse)) if mse > 0 else None
        values = (ssim, psnr, bias, healthy, lesion, ratio)
        return dict(zip(FIDELITY_KEYS, values, strict=True))
