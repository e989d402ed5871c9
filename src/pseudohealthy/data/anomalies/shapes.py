"""Random anomaly shapes: sheared, rotated rectangles and ellipses placed on the foreground."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import label
from scipy.signal import fftconvolve

from .style import DEFAULT_STYLE, check_style

__all__ = ["Shape", "draw_shape", "foreground_bbox", "region_bbox", "sample_shape"]

SIDE_BOUNDS = (0.06, 0.8)  # side lengths as fractions of the foreground region's box


@dataclass(frozen=True)
class Shape:
    """One placed shape.

    ``linear`` maps normalised local coordinates ``u`` (unit square or unit disk) to pixel
    offsets ``(row, col)`` from ``centre``; the shape is ``{centre + linear @ u : |u| <= 1}``
    with the max-norm for rectangles and the 2-norm for ellipses. ``area`` is the pixel
    count of the whole rasterised shape (more than ``mask.sum()`` when the border cuts it);
    ``sides`` the drawn side lengths, before shear, rotation and rescaling.
    """

    mask: np.ndarray  # bool, the image's shape
    box: tuple[int, int, int, int]  # tight bounding box (r0, r1, c0, c1), half-open
    centre: tuple[int, int]  # (row, col) pixel of the shape centre
    linear: np.ndarray  # 2x2 float
    kind: str  # "rectangle" | "ellipse"
    area: int = 0
    sides: tuple[float, float] = (0.0, 0.0)

    def _local(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inv = np.linalg.inv(self.linear)
        dr = np.asarray(rows, np.float64) - self.centre[0]
        dc = np.asarray(cols, np.float64) - self.centre[1]
        return inv[0, 0] * dr + inv[0, 1] * dc, inv[1, 0] * dr + inv[1, 1] * dc

    def radius(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Normalised radius of pixels: 0 at the centre, 1 on the edge along that ray."""
        u0, u1 = self._local(rows, cols)
        if self.kind == "ellipse":
            return np.hypot(u0, u1)
        return np.maximum(np.abs(u0), np.abs(u1))

    def ray_fraction(self, origin: tuple[float, float], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``d / D`` of pixels seen from ``origin`` (a point inside the shape).

        ``d`` is the pixel's distance from ``origin``, ``D`` the distance from ``origin`` to
        the shape's edge along the same ray; 0 at ``origin`` itself.
        """
        o0, o1 = self._local(np.array(origin[0]), np.array(origin[1]))
        p0, p1 = self._local(rows, cols)
        v0, v1 = p0 - o0, p1 - o1  # the ray reaches the pixel at t = 1
        with np.errstate(divide="ignore", invalid="ignore"):
            if self.kind == "ellipse":
                a, b, c = v0 * v0 + v1 * v1, o0 * v0 + o1 * v1, min(o0 * o0 + o1 * o1 - 1.0, 0.0)
                t = (-b + np.sqrt(b * b - a * c)) / a
            else:
                o0, o1 = np.clip(o0, -1.0, 1.0), np.clip(o1, -1.0, 1.0)  # rounding at the edge
                t0 = np.where(v0 != 0, (np.sign(v0) - o0) / v0, np.inf)
                t1 = np.where(v1 != 0, (np.sign(v1) - o1) / v1, np.inf)
                t = np.minimum(t0, t1)
            return np.where(np.isfinite(t) & (t > 0), 1.0 / t, 0.0)

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


_REGION_BOXES: dict[bytes, tuple[int, int, int, int]] = {}  # a slice's box, reused across its draws
_REGION_CACHE_SIZE = 4096


def region_bbox(foreground: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box of the largest 8-connected region of a non-empty bool mask (cached by content)."""
    fg = np.asarray(foreground, dtype=bool)
    key = hashlib.blake2b(np.packbits(fg).tobytes() + repr(fg.shape).encode(), digest_size=16).digest()
    box = _REGION_BOXES.get(key)
    if box is None:
        labels, n = label(fg, structure=np.ones((3, 3), bool))
        if n > 1:
            fg = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        box = foreground_bbox(fg)
        if len(_REGION_BOXES) >= _REGION_CACHE_SIZE:
            _REGION_BOXES.clear()
        _REGION_BOXES[key] = box
    return box


def _half_extents(linear: np.ndarray, kind: str) -> np.ndarray:
    """Half the bounding box (rows, cols) of the shape ``linear`` maps out."""
    if kind == "ellipse":
        return np.linalg.norm(linear, axis=1)
    return np.abs(linear).sum(axis=1)


def _sample_linear(
    foreground: np.ndarray, rng: np.random.Generator, size: float | None, style: str
) -> tuple[np.ndarray, str, np.ndarray]:
    """``(linear, kind, sides)``: the reference's side, shear and rotation distributions.

    ``reference``: integer sides bounded by the largest connected region's box, shear on both
    off-diagonal terms, rescaled so that the transformed shape's box fits the upper bound;
    ``legacy``: the whole foreground's box, one shear term, no rescale.
    """
    r0, r1, c0, c1 = region_bbox(foreground) if style == "reference" else foreground_bbox(foreground)
    extent = np.array([r1 - r0, c1 - c0], np.float64)
    scale = np.array(foreground.shape, np.float64) if size is None else np.array([size, size], np.float64)
    lb, ub = SIDE_BOUNDS[0] * extent, SIDE_BOUNDS[1] * extent
    sides = np.clip((0.03 + rng.gamma(2.0, 0.1, size=2)) * scale, lb, ub)
    if style == "reference":
        sides = np.floor(sides)
    sides = np.maximum(sides, 2.0)
    kind = "rectangle" if rng.random() < 0.5 else "ellipse"
    shear = rng.normal(0.0, 0.2, size=2 if style == "reference" else 1)
    angle = rng.uniform(-np.pi / 2, np.pi / 2)
    cos, sin = np.cos(angle), np.sin(angle)
    rot = np.array([[cos, -sin], [sin, cos]])
    shear_m = np.array([[1.0, shear[0]], [shear[-1] if shear.size == 2 else 0.0, 1.0]])
    linear = rot @ shear_m @ np.diag(sides / 2.0)
    if style == "reference":
        box = 2.0 * _half_extents(linear, kind)
        linear = linear * min(1.0, float(np.min(np.maximum(ub, 2.0) / box)))
    return linear, kind, sides


def _stamp(linear: np.ndarray, kind: str, limit: tuple[int, int]) -> np.ndarray:
    """Rasterise the shape on an odd-sized grid centred on its centre pixel."""
    half = np.ceil(_half_extents(linear, kind)).astype(int)
    half = np.minimum(half, (np.asarray(limit) - 1) // 2)
    dr = np.arange(-half[0], half[0] + 1, dtype=np.float64)[:, None]
    dc = np.arange(-half[1], half[1] + 1, dtype=np.float64)[None, :]
    inv = np.linalg.inv(linear)
    u0 = inv[0, 0] * dr + inv[0, 1] * dc
    u1 = inv[1, 0] * dr + inv[1, 1] * dc
    if kind == "ellipse":
        return u0 * u0 + u1 * u1 <= 1.0
    return (np.abs(u0) <= 1.0) & (np.abs(u1) <= 1.0)


def _pick(counts: np.ndarray, area: float, threshold: float, rng: np.random.Generator) -> tuple[int, int]:
    """A position drawn uniformly among those whose overlap reaches ``threshold`` (halved until one does)."""
    while True:
        ok = np.flatnonzero(counts >= max(threshold * area - 0.25, 0.5))  # at least one pixel
        if ok.size:
            break
        threshold /= 2.0
    r, c = np.unravel_index(ok[rng.integers(ok.size)], counts.shape)
    return int(r), int(c)


def _place_inside(
    fg: np.ndarray, stamp: np.ndarray, min_overlap: float, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Place the whole stamp inside the image (None when it cannot overlap the foreground so)."""
    rows, cols = np.flatnonzero(stamp.any(axis=1)), np.flatnonzero(stamp.any(axis=0))
    tight = stamp[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    sh, sw = tight.shape
    if sh > fg.shape[0] or sw > fg.shape[1]:
        return None
    counts = fftconvolve(fg.astype(np.float32), tight[::-1, ::-1].astype(np.float32), mode="valid")
    if float(counts.max()) < 0.5:
        return None
    y, x = _pick(counts, float(tight.sum()), min_overlap, rng)
    mask = np.zeros(fg.shape, dtype=bool)
    mask[y : y + sh, x : x + sw] = tight
    return mask, (y + stamp.shape[0] // 2 - int(rows[0]), x + stamp.shape[1] // 2 - int(cols[0]))


def _place_centre(
    fg: np.ndarray, stamp: np.ndarray, min_overlap: float, rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int]]:
    """Place the stamp's centre pixel inside the image; the border may cut the shape."""
    counts = fftconvolve(fg.astype(np.float32), stamp[::-1, ::-1].astype(np.float32), mode="same")
    r, c = _pick(counts, float(stamp.sum()), min_overlap, rng)
    mask = np.zeros(fg.shape, dtype=bool)
    hr, hc = stamp.shape[0] // 2, stamp.shape[1] // 2
    rs0, rs1 = max(r - hr, 0), min(r + hr + 1, fg.shape[0])
    cs0, cs1 = max(c - hc, 0), min(c + hc + 1, fg.shape[1])
    mask[rs0:rs1, cs0:cs1] = stamp[rs0 - (r - hr) : rs1 - (r - hr), cs0 - (c - hc) : cs1 - (c - hc)]
    return mask, (r, c)


def draw_shape(
    foreground: np.ndarray,
    rng: np.random.Generator,
    *,
    size: float | None = None,
    min_overlap: float = 0.5,
    style: str = DEFAULT_STYLE,
) -> Shape:
    """Sample a shape and place it on the foreground.

    The reference tries random positions, halving the overlap threshold ``min_overlap``
    once before the first try (so at least 25% of the shape lies on the foreground) and
    again after every 1000 failures; here the overlap of every position is computed at
    once (an FFT correlation) and the position is drawn uniformly among those that pass,
    halving the threshold while none does. ``reference``: the whole shape lies inside the
    image; ``legacy``: no first halving, only the centre pixel must lie inside the image
    (the border may cut the shape). ``size`` is the reference's image size (128); default:
    the image's own extent per axis.
    """
    style = check_style(style)
    fg = np.asarray(foreground, dtype=bool)
    if fg.ndim != 2:
        raise ValueError(f"foreground must be 2D, got shape {fg.shape}")
    if not fg.any():
        raise ValueError("the foreground mask is empty: there is nowhere to place an anomaly")
    linear, kind, sides = _sample_linear(fg, rng, size, style)
    stamp = _stamp(linear, kind, (2 * fg.shape[0] + 1, 2 * fg.shape[1] + 1))
    placed = _place_inside(fg, stamp, min_overlap / 2.0, rng) if style == "reference" else None
    mask, centre = placed if placed is not None else _place_centre(fg, stamp, min_overlap, rng)
    return Shape(mask, foreground_bbox(mask), centre, linear, kind, int(stamp.sum()), (sides[0], sides[1]))


def sample_shape(
    foreground: np.ndarray, rng: np.random.Generator, *, size: float | None = None, style: str = DEFAULT_STYLE
) -> np.ndarray:
    """A random anomaly shape (bool mask of the image's shape) overlapping the foreground."""
    return draw_shape(foreground, rng, size=size, style=style).mask
