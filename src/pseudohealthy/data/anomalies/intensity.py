"""Smooth intensity change: fractal Perlin noise added inside a shape with soft edges."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import distance_transform_edt

from .shapes import draw_shape

__all__ = ["fractal_noise", "intensity_task", "perlin_noise"]


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2D gradient (Perlin) noise with ``res`` lattice cells over ``shape``, any shape.

    The lattice is shifted by a random phase so that the patch corners are not lattice points.
    Values lie in about [-0.71, 0.71].
    """
    h, w = shape
    ry, rx = max(int(res[0]), 1), max(int(res[1]), 1)
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 2, rx + 2))
    gy, gx = np.sin(angles), np.cos(angles)
    y = (np.arange(h) + 0.5) * (ry / h) + rng.random()
    x = (np.arange(w) + 0.5) * (rx / w) + rng.random()
    yi, xi = y.astype(np.intp), x.astype(np.intp)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]
    yi, xi = yi[:, None], xi[None, :]

    def corner(oy: int, ox: int) -> np.ndarray:
        iy, ix = yi + oy, xi + ox
        return gy[iy, ix] * (yf - oy) + gx[iy, ix] * (xf - ox)

    fy, fx = _fade(yf), _fade(xf)
    top = corner(0, 0) + fx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + fx * (corner(1, 1) - corner(1, 0))
    return top + fy * (bottom - top)


def fractal_noise(
    shape: tuple[int, int],
    res: tuple[int, int],
    rng: np.random.Generator,
    *,
    octaves: int = 4,
    persistence: float = 0.5,
) -> np.ndarray:
    """Fractal Perlin noise (octaves doubling in frequency), normalised to [0, 1]."""
    total = np.zeros(shape, dtype=np.float64)
    amplitude = 1.0
    for octave in range(octaves):
        k = 2**octave
        total += amplitude * perlin_noise(shape, (res[0] * k, res[1] * k), rng)
        amplitude *= persistence
    span = total.max() - total.min()
    return (total - total.min()) / span if span > 0 else np.zeros(shape, dtype=np.float64)


def intensity_task(
    image: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    *,
    size: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``patch += w * a * noise`` inside a random shape.

    ``a = ±(0.05 + Gamma(3, 0.1))``, noise = normalised fractal Perlin noise over the
    shape's box, ``w = min(EDT(shape) / s, 1)`` with ``s = size * (0.02 + Gamma(3, 0.01))``.
    """
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    shape = draw_shape(foreground, rng, size=size)
    ref = float(max(img.shape)) if size is None else float(size)
    amplitude = (0.05 + rng.gamma(3.0, 0.1)) * (1.0 if rng.random() < 0.5 else -1.0)
    soft = ref * (0.02 + rng.gamma(3.0, 0.01))
    r0, r1, c0, c1 = shape.box
    inside = shape.mask[r0:r1, c0:c1]
    box = inside.shape
    cells = int(rng.integers(1, 4))
    longest = max(box)
    res = (max(1, round(cells * box[0] / longest)), max(1, round(cells * box[1] / longest)))
    noise = fractal_noise(box, res, rng)
    weight = np.minimum(distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1] / soft, 1.0)
    out = img.copy()
    patch = out[r0:r1, c0:c1]
    change = (weight * amplitude * noise).astype(np.float32)
    patch[inside] = np.clip(patch[inside] + change[inside], lo, hi)
    return out, shape.mask.copy()
