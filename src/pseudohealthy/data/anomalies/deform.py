"""Sink and source deformations: radial resampling inside a shape."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import map_coordinates

from .shapes import draw_shape

__all__ = ["deformation_task", "exponent_for_push", "max_push_fraction", "radial_map"]


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


def deformation_task(
    image: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    kind: str,
    *,
    size: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pull tissue towards (sink) or push it away from (source) the centre of a random shape.

    The push distance p ~ U(0.5, 5) pixels is the largest displacement inside the shape,
    bounded by half the shape's largest radius; resampling is cubic.
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    shape = draw_shape(foreground, rng, size=size)
    extent = shape.max_extent
    push = min(rng.uniform(0.5, 5.0), 0.5 * extent)
    f = exponent_for_push(push / extent)
    r0, r1, c0, c1 = shape.box
    rows, cols = np.nonzero(shape.mask[r0:r1, c0:c1])
    rows, cols = rows + r0, cols + c0
    ratio = radial_map(shape.radius(rows, cols), f, kind)
    src_r = shape.centre[0] + (rows - shape.centre[0]) * ratio
    src_c = shape.centre[1] + (cols - shape.centre[1]) * ratio
    # resample from a crop with a margin for the cubic spline
    m = 4
    h, w = img.shape
    q0, q1, p0, p1 = max(r0 - m, 0), min(r1 + m, h), max(c0 - m, 0), min(c1 + m, w)
    values = map_coordinates(img[q0:q1, p0:p1], [src_r - q0, src_c - p0], order=3, mode="nearest")
    out = img.copy()
    out[rows, cols] = np.clip(values, lo, hi)
    return out, shape.mask.copy()
