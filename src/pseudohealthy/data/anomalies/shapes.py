"""Random anomaly shapes: sheared, rotated rectangles and ellipses placed on the foreground."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import fftconvolve

__all__ = ["Shape", "draw_shape", "foreground_bbox", "sample_shape"]


@dataclass(frozen=True)
class Shape:
    """One placed shape.

    ``linear`` maps normalised local coordinates ``u`` (unit square or unit disk) to pixel
    offsets ``(row, col)`` from ``centre``; the shape is ``{centre + linear @ u : |u| <= 1}``
    with the max-norm for rectangles and the 2-norm for ellipses.
    """

    mask: np.ndarray  # bool, the image's shape
    box: tuple[int, int, int, int]  # tight bounding box (r0, r1, c0, c1), half-open
    centre: tuple[int, int]  # (row, col) pixel of the shape centre
    linear: np.ndarray  # 2x2 float
    kind: str  # "rectangle" | "ellipse"

    def radius(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Normalised radius of pixels: 0 at the centre, 1 on the edge along that ray."""
        inv = np.linalg.inv(self.linear)
        dr = np.asarray(rows, np.float64) - self.centre[0]
        dc = np.asarray(cols, np.float64) - self.centre[1]
        u0 = inv[0, 0] * dr + inv[0, 1] * dc
        u1 = inv[1, 0] * dr + inv[1, 1] * dc
        if self.kind == "ellipse":
            return np.hypot(u0, u1)
        return np.maximum(np.abs(u0), np.abs(u1))

    @property
    def max_extent(self) -> float:
        """Largest distance (pixels) from the centre to the edge."""
        if self.kind == "ellipse":
            return float(np.linalg.svd(self.linear, compute_uv=False)[0])
        corners = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float64).T
        return float(np.max(np.linalg.norm(self.linear @ corners, axis=0)))


def foreground_bbox(foreground: np.ndarray) -> tuple[int, int, int, int]:
    """Half-open bounding box ``(r0, r1, c0, c1)`` of a non-empty bool mask."""
    rows = np.flatnonzero(foreground.any(axis=1))
    cols = np.flatnonzero(foreground.any(axis=0))
    if rows.size == 0:
        raise ValueError("the foreground mask is empty: there is nowhere to place an anomaly")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _sample_linear(
    foreground: np.ndarray, rng: np.random.Generator, size: float | None
) -> tuple[np.ndarray, str]:
    """Side lengths, shear, rotation and kind (the reference's distributions)."""
    r0, r1, c0, c1 = foreground_bbox(foreground)
    extent = np.array([r1 - r0, c1 - c0], np.float64)
    scale = np.array(foreground.shape, np.float64) if size is None else np.array([size, size], np.float64)
    sides = (0.03 + rng.gamma(2.0, 0.1, size=2)) * scale
    sides = np.maximum(np.clip(sides, 0.06 * extent, 0.8 * extent), 2.0)
    kind = "rectangle" if rng.random() < 0.5 else "ellipse"
    shear = rng.normal(0.0, 0.2)
    angle = rng.uniform(-np.pi / 2, np.pi / 2)
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    shear_m = np.array([[1.0, shear], [0.0, 1.0]])
    return rot @ shear_m @ np.diag(sides / 2.0), kind


def _stamp(linear: np.ndarray, kind: str, limit: tuple[int, int]) -> np.ndarray:
    """Rasterise the shape on an odd-sized grid centred on its centre pixel."""
    half = np.ceil(np.abs(linear).sum(axis=1)).astype(int)
    half = np.minimum(half, (np.asarray(limit) - 1) // 2)
    dr = np.arange(-half[0], half[0] + 1, dtype=np.float64)[:, None]
    dc = np.arange(-half[1], half[1] + 1, dtype=np.float64)[None, :]
    inv = np.linalg.inv(linear)
    u0 = inv[0, 0] * dr + inv[0, 1] * dc
    u1 = inv[1, 0] * dr + inv[1, 1] * dc
    if kind == "ellipse":
        return u0 * u0 + u1 * u1 <= 1.0
    return (np.abs(u0) <= 1.0) & (np.abs(u1) <= 1.0)


def draw_shape(
    foreground: np.ndarray,
    rng: np.random.Generator,
    *,
    size: float | None = None,
    min_overlap: float = 0.5,
) -> Shape:
    """Sample a shape and place it so that at least ``min_overlap`` of it lies on the foreground.

    The reference tries random centres and halves the threshold after every 1000 failures;
    here the overlap of every centre is computed at once (an FFT correlation) and the centre
    is drawn uniformly among those that pass, halving the threshold while none does. The
    centre pixel lies inside the image; parts of the shape beyond the border are cut off.
    ``size`` is the reference's image size (128); default: the image's own extent per axis.
    """
    fg = np.asarray(foreground, dtype=bool)
    if fg.ndim != 2:
        raise ValueError(f"foreground must be 2D, got shape {fg.shape}")
    linear, kind = _sample_linear(fg, rng, size)
    stamp = _stamp(linear, kind, (2 * fg.shape[0] + 1, 2 * fg.shape[1] + 1))
    area = float(stamp.sum())
    counts = fftconvolve(fg.astype(np.float32), stamp[::-1, ::-1].astype(np.float32), mode="same")
    threshold = min_overlap
    best = float(counts.max())
    if best < 0.5:
        raise ValueError("the foreground mask is empty: there is nowhere to place an anomaly")
    while True:
        ok = np.flatnonzero(counts >= threshold * area - 0.25)
        if ok.size:
            break
        threshold /= 2.0
    centre = np.unravel_index(ok[rng.integers(ok.size)], fg.shape)
    mask = np.zeros(fg.shape, dtype=bool)
    hr, hc = stamp.shape[0] // 2, stamp.shape[1] // 2
    r, c = int(centre[0]), int(centre[1])
    rs0, rs1 = max(r - hr, 0), min(r + hr + 1, fg.shape[0])
    cs0, cs1 = max(c - hc, 0), min(c + hc + 1, fg.shape[1])
    mask[rs0:rs1, cs0:cs1] = stamp[rs0 - (r - hr) : rs1 - (r - hr), cs0 - (c - hc) : cs1 - (c - hc)]
    return Shape(mask, foreground_bbox(mask), (r, c), linear, kind)


def sample_shape(
    foreground: np.ndarray, rng: np.random.Generator, *, size: float | None = None
) -> np.ndarray:
    """A random anomaly shape (bool mask of the image's shape) overlapping the foreground."""
    return draw_shape(foreground, rng, size=size).mask
