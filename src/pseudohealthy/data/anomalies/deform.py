"""Sink and source deformations: radial resampling inside a shape."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_erosion, map_coordinates

from .shapes import Shape, draw_shape
from .style import DEFAULT_STYLE, check_style

__all__ = [
    "Deformation",
    "deformation_for",
    "deformation_task",
    "exponent_for_push",
    "fit_exponent",
    "max_push_fraction",
    "mean_edge_distance",
    "push_bounds",
    "radial_map",
    "sample_deformation",
]

_SQRT2 = float(np.sqrt(2.0))


def max_push_fraction(f: float) -> float:
    """Largest radial displacement, as a fraction of the edge distance D, for exponent f > 1.

    For ``rho' = rho**f`` it is reached at ``rho* = f**(-1/(f-1))`` and equals
    ``rho* (1 - 1/f)``; the sink map ``1 - (1 - rho)**f`` has the same maximum.
    """
    if f <= 1.0:
        return 0.0
    return float(f ** (-1.0 / (f - 1.0)) * (1.0 - 1.0 / f))


def exponent_for_push(fraction: float, *, f_max: float = 1e4) -> float:
    """The exponent f whose largest displacement is ``fraction`` of D (bisection on log f)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"push fraction must be in (0, 1), got {fraction}")
    lo, hi = 0.0, np.log(f_max)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if max_push_fraction(float(np.exp(mid))) < fraction:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def push_bounds(mean_edge: float) -> tuple[float, float]:
    """The reference's range of the offset p: ``(max(0.5, 0.1 A/√2), min(5, 0.9 A/√2))``."""
    return max(0.5, 0.1 * mean_edge / _SQRT2), min(5.0, 0.9 * mean_edge / _SQRT2)


def fit_exponent(mean_edge: float, push: float) -> float:
    """The f whose curve (with D = A) passes through ``(A/2 ± p/√2, A/2 ∓ p/√2)``.

    Source ``d' = d**f / A**(f-1)`` through ``(A/2 + p/√2, A/2 - p/√2)``; the sink curve
    through the mirrored point gives the same f: ``log(1/2 - q) / log(1/2 + q)``, ``q = p / (A√2)``.
    """
    q = push / (mean_edge * _SQRT2)
    if not 0.0 <= q < 0.5:
        raise ValueError(f"offset p = {push} must be below A/√2 = {mean_edge / _SQRT2}")
    return float(np.log(0.5 - q) / np.log(0.5 + q))


def radial_map(rho: np.ndarray, f: float, kind: str) -> np.ndarray:
    """Sampling radius ``rho' / rho`` ratio for normalised radius ``rho`` in [0, 1].

    sink: ``d' = D - (D - d)**f / D**(f-1)``; source: ``d' = d**f / D**(f-1)``; with
    ``rho = d / D`` these are ``1 - (1 - rho)**f`` and ``rho**f``. The output pixel at
    ``rho`` takes the input at ``rho'`` along the same ray.
    """
    rho = np.clip(rho, 0.0, 1.0)
    safe = np.maximum(rho, 1e-12)
    if kind == "source":
        return safe ** (f - 1.0)
    if kind == "sink":
        return np.where(rho > 1e-12, (1.0 - (1.0 - rho) ** f) / safe, f)
    raise ValueError(f"kind must be 'sink' or 'source', got {kind!r}")


@dataclass(frozen=True)
class Deformation:
    """One drawn deformation: pixel ``(rows[i], cols[i])`` takes the image at ``(src_rows[i], src_cols[i])``.

    ``centre`` (row, col) is the centre of the radial map, ``exponent`` its f, ``push`` the
    offset p and ``mean_edge`` the mean edge distance A (legacy: the largest displacement
    and the shape's largest radius).
    """

    shape: Shape
    kind: str
    centre: tuple[float, float]
    exponent: float
    push: float
    mean_edge: float
    rows: np.ndarray
    cols: np.ndarray
    src_rows: np.ndarray
    src_cols: np.ndarray

    @property
    def displacement(self) -> np.ndarray:
        """Distance (pixels) between each pixel and the point it samples."""
        return np.hypot(self.src_rows - self.rows, self.src_cols - self.cols)


def mean_edge_distance(shape: Shape, centre: tuple[float, float]) -> float:
    """A: the mean distance from ``centre`` to the shape's edge pixels (mask minus its erosion)."""
    r0, r1, c0, c1 = shape.box
    inside = np.pad(shape.mask[r0:r1, c0:c1], 1)
    er, ec = np.nonzero(inside & ~binary_erosion(inside))
    return float(np.mean(np.hypot(er - 1 + r0 - centre[0], ec - 1 + c0 - centre[1])))


def _reference_map(shape: Shape, rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator):
    """Centre a random pixel of the shape, D along each ray from it, f through the fitted point."""
    k = int(rng.integers(rows.size))
    centre = (float(rows[k]), float(cols[k]))
    rho = shape.ray_fraction(centre, rows, cols)
    mean_edge = mean_edge_distance(shape, centre)
    lo, hi = push_bounds(mean_edge)
    push = float(rng.uniform(lo, hi)) if lo < hi else max(hi, 0.0)
    f = fit_exponent(mean_edge, push) if mean_edge > 0 else 1.0
    return centre, rho, f, push, mean_edge


def _legacy_map(shape: Shape, rows: np.ndarray, cols: np.ndarray, rng: np.random.Generator):
    """Centre the shape's centre; p ~ U(0.5, 5) is the largest displacement, at most half the radius."""
    extent = shape.max_extent
    push = min(rng.uniform(0.5, 5.0), 0.5 * extent)
    f = exponent_for_push(push / extent)
    centre = (float(shape.centre[0]), float(shape.centre[1]))
    return centre, shape.radius(rows, cols), f, push, extent


def sample_deformation(
    foreground: np.ndarray,
    rng: np.random.Generator,
    kind: str,
    *,
    size: float | None = None,
    style: str = DEFAULT_STYLE,
) -> Deformation:
    """Draw a shape and the radial map of a sink or source deformation inside it."""
    style = check_style(style)
    if kind not in ("sink", "source"):
        raise ValueError(f"kind must be 'sink' or 'source', got {kind!r}")
    return deformation_for(draw_shape(foreground, rng, size=size, style=style), rng, kind, style=style)


def deformation_for(
    shape: Shape, rng: np.random.Generator, kind: str, *, style: str = DEFAULT_STYLE
) -> Deformation:
    """The radial map of a sink or source deformation inside a given shape.

    ``reference``: the centre is a random pixel of the shape, ``D`` runs along each ray from
    it to the edge, ``A`` is :func:`mean_edge_distance`, ``p ~ U(push_bounds(A))`` and f is
    :func:`fit_exponent`; ``legacy``: the shape's centre, ``p ~ U(0.5, 5)`` the largest
    displacement (at most half the largest radius).
    """
    style = check_style(style)
    r0, r1, c0, c1 = shape.box
    rows, cols = np.nonzero(shape.mask[r0:r1, c0:c1])
    rows, cols = rows + r0, cols + c0
    draw = _reference_map if style == "reference" else _legacy_map
    centre, rho, f, push, mean_edge = draw(shape, rows, cols, rng)
    ratio = radial_map(rho, f, kind)
    src_r = centre[0] + (rows - centre[0]) * ratio
    src_c = centre[1] + (cols - centre[1]) * ratio
    return Deformation(shape, kind, centre, f, push, mean_edge, rows, cols, src_r, src_c)


def deformation_task(
    image: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    kind: str,
    *,
    size: float | None = None,
    style: str = DEFAULT_STYLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Pull tissue towards (sink) or push it away from (source) a point of a random shape.

    The map is drawn by :func:`sample_deformation`; resampling is cubic.
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    deform = sample_deformation(foreground, rng, kind, size=size, style=style)
    r0, r1, c0, c1 = deform.shape.box
    # resample from a crop with a margin for the cubic spline
    m = 4
    h, w = img.shape
    q0, q1, p0, p1 = max(r0 - m, 0), min(r1 + m, h), max(c0 - m, 0), min(c1 + m, w)
    coords = [deform.src_rows - q0, deform.src_cols - p0]
    values = map_coordinates(img[q0:q1, p0:p1], coords, order=3, mode="nearest")
    out = img.copy()
    out[deform.rows, deform.cols] = np.clip(values, lo, hi)
    return out, deform.shape.mask.copy()
