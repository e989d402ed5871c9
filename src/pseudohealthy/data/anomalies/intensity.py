"""Smooth intensity change: fractal Perlin noise added inside a shape with soft edges."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from .shapes import Shape, draw_shape
from .style import DEFAULT_STYLE, check_style

__all__ = [
    "IntensityPlan",
    "apply_intensity",
    "edge_distance",
    "fractal_noise",
    "intensity_plan",
    "intensity_task",
    "perlin_noise",
]

LEGACY_OCTAVES = 4


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """2D gradient (Perlin) noise with ``res`` lattice cells (at least 1, any real) over ``shape``.

    The lattice is shifted by a random phase so that the patch corners are not lattice points.
    Values lie in about [-0.71, 0.71].
    """
    h, w = shape
    ry, rx = max(float(res[0]), 1.0), max(float(res[1]), 1.0)
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(int(np.ceil(ry)) + 2, int(np.ceil(rx)) + 2))
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
    res: tuple[float, float],
    rng: np.random.Generator,
    *,
    octaves: int = LEGACY_OCTAVES,
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


@dataclass(frozen=True)
class IntensityPlan:
    """One drawn intensity change: ``amplitude`` a, edge scale ``soft`` s, Perlin ``layers``,
    base ``frequency`` (lattice cells per mean side of the box) and the ``noise`` over the box."""

    amplitude: float
    soft: float
    layers: int
    frequency: float
    noise: np.ndarray


def edge_distance(inside: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel of ``inside`` to the nearest pixel outside it (0 outside)."""
    return distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]


def _lattice(box: tuple[int, int], frequency: float) -> tuple[float, float]:
    mean_side = 0.5 * (box[0] + box[1])
    return frequency * box[0] / mean_side, frequency * box[1] / mean_side


def intensity_plan(
    shape: Shape, rng: np.random.Generator, ref: float, *, style: str = DEFAULT_STYLE
) -> IntensityPlan:
    """Draw a, s and the noise for ``shape`` (``ref``: the reference image size, 128).

    ``a = ±(0.05 + Gamma(3, 0.1))``, ``s = ref (0.02 + Gamma(3, 0.01))``. ``reference``: s
    capped at the shape's largest edge distance, ``1 + Poisson(1)`` Perlin layers with base
    frequency ``1 + Exp((mean side / 3 - 1) / 4.5)``; ``legacy``: no cap, 4 octaves with
    1-3 cells.
    """
    style = check_style(style)
    r0, r1, c0, c1 = shape.box
    box = (r1 - r0, c1 - c0)
    amplitude = (0.05 + rng.gamma(3.0, 0.1)) * (1.0 if rng.random() < 0.5 else -1.0)
    soft = ref * (0.02 + rng.gamma(3.0, 0.01))
    if style == "reference":
        soft = min(soft, float(edge_distance(shape.mask[r0:r1, c0:c1]).max()))
        layers = 1 + int(rng.poisson(1.0))
        frequency = 1.0 + rng.exponential(max(0.5 * (box[0] + box[1]) / 3.0 - 1.0, 0.0) / 4.5)
        noise = fractal_noise(box, _lattice(box, frequency), rng, octaves=layers)
    else:
        layers, cells = LEGACY_OCTAVES, int(rng.integers(1, 4))
        longest = max(box)
        res = (max(1, round(cells * box[0] / longest)), max(1, round(cells * box[1] / longest)))
        frequency = float(cells)
        noise = fractal_noise(box, res, rng, octaves=layers)
    return IntensityPlan(float(amplitude), float(soft), layers, float(frequency), noise)


def apply_intensity(image: np.ndarray, shape: Shape, plan: IntensityPlan) -> np.ndarray:
    """``image + w a noise`` inside ``shape`` with ``w = min(EDT / s, 1)``, clipped to the image's range."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    r0, r1, c0, c1 = shape.box
    inside = shape.mask[r0:r1, c0:c1]
    weight = np.minimum(edge_distance(inside) / plan.soft, 1.0)
    out = img.copy()
    patch = out[r0:r1, c0:c1]
    change = (weight * plan.amplitude * plan.noise).astype(np.float32)
    patch[inside] = np.clip(patch[inside] + change[inside], lo, hi)
    return out


def intensity_task(
    image: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    *,
    size: float | None = None,
    style: str = DEFAULT_STYLE,
) -> tuple[np.ndarray, np.ndarray]:
    """``patch += w * a * noise`` inside a random shape (:func:`intensity_plan`, :func:`apply_intensity`)."""
    img = np.asarray(image, dtype=np.float32)
    shape = draw_shape(foreground, rng, size=size, style=style)
    ref = float(max(img.shape)) if size is None else float(size)
    plan = intensity_plan(shape, rng, ref, style=style)
    return apply_intensity(img, shape, plan), shape.mask.copy()
