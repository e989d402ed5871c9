"""Poisson image editing: mixed-gradient guidance and an exact DST-I Poisson solver."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.fft import dstn
from scipy.ndimage import map_coordinates

from .shapes import draw_shape

__all__ = [
    "Sources",
    "blend",
    "guidance_divergence",
    "mixed_gradients",
    "poisson_solve",
    "poisson_task",
    "sample_source_patch",
]

# a list (or stack) of 2D images, or a function that draws one
Sources = Sequence[np.ndarray] | Callable[[np.random.Generator], np.ndarray]


def _eigenvalues(n: int) -> np.ndarray:
    """Eigenvalues of the 1D Dirichlet second difference (diagonalised by DST-I)."""
    return 2.0 * np.cos(np.pi * np.arange(1, n + 1) / (n + 1)) - 2.0


def poisson_solve(divergence: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """Solve the 5-point discrete Poisson equation exactly on a rectangle.

    ``boundary`` (h, w) gives the Dirichlet values on its outer ring (its interior is ignored);
    ``divergence`` (h-2, w-2) is the right-hand side ``Δu`` at the interior pixels. Returns
    ``u`` (h, w), equal to ``boundary`` on the ring. Solved with DST-I (``scipy.fft.dstn``).
    """
    b = np.asarray(boundary, dtype=np.float64)
    h, w = b.shape
    if h < 3 or w < 3:
        return b.copy()
    rhs = np.array(divergence, dtype=np.float64, copy=True)
    if rhs.shape != (h - 2, w - 2):
        raise ValueError(f"divergence must have shape {(h - 2, w - 2)}, got {rhs.shape}")
    rhs[0, :] -= b[0, 1:-1]
    rhs[-1, :] -= b[-1, 1:-1]
    rhs[:, 0] -= b[1:-1, 0]
    rhs[:, -1] -= b[1:-1, -1]
    denom = _eigenvalues(h - 2)[:, None] + _eigenvalues(w - 2)[None, :]
    u = b.copy()
    u[1:-1, 1:-1] = dstn(dstn(rhs, type=1, norm="ortho") / denom, type=1, norm="ortho")
    return u


def mixed_gradients(target_grad: np.ndarray, source_grad: np.ndarray) -> np.ndarray:
    """Per element keep the gradient of larger magnitude (the target's on ties)."""
    return np.where(np.abs(source_grad) > np.abs(target_grad), source_grad, target_grad)


def guidance_divergence(
    target: np.ndarray, source: np.ndarray, region: np.ndarray, *, mixed: bool = True
) -> np.ndarray:
    """Divergence (interior, (h-2, w-2)) of the guidance field.

    Forward differences; on every edge touching ``region`` the guidance is the source
    gradient (``mixed``: the larger of source and target gradient), elsewhere the target's.
    """
    t = np.asarray(target, np.float64)
    s = np.asarray(source, np.float64)
    gx_t, gy_t = np.diff(t, axis=1), np.diff(t, axis=0)
    gx_s, gy_s = np.diff(s, axis=1), np.diff(s, axis=0)
    if mixed:
        gx_s, gy_s = mixed_gradients(gx_t, gx_s), mixed_gradients(gy_t, gy_s)
    ex = region[:, 1:] | region[:, :-1]
    ey = region[1:, :] | region[:-1, :]
    vx = np.where(ex, gx_s, gx_t)
    vy = np.where(ey, gy_s, gy_t)
    return (vx[1:-1, 1:] - vx[1:-1, :-1]) + (vy[1:, 1:-1] - vy[:-1, 1:-1])


def blend(target: np.ndarray, source: np.ndarray, region: np.ndarray, *, mixed: bool = True) -> np.ndarray:
    """Poisson-blend ``source`` into ``target`` inside ``region`` (all three the same shape).

    The solve covers the whole array with the target as Dirichlet boundary on its outer
    ring; ``region`` must not touch that ring. Outside ``region`` the target is returned.
    """
    region = np.asarray(region, dtype=bool)
    if region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any():
        raise ValueError("the blend region must not touch the border of the solve box")
    div = guidance_divergence(target, source, region, mixed=mixed)
    u = poisson_solve(div, target)
    return np.where(region, u, target)


def _draw_source(sources: Sources, rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
    if callable(sources):
        return np.asarray(sources(rng))
    n = len(sources)
    if n == 0:
        raise ValueError("the list of source images is empty")
    k = int(rng.integers(n))
    if n > 1 and np.may_share_memory(sources[k], avoid):  # not the image itself
        k = (k + 1 + int(rng.integers(n - 1))) % n
    return np.asarray(sources[k])


def sample_source_patch(
    source: np.ndarray,
    out_shape: tuple[int, int],
    origin: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Resample a patch of ``source`` onto a target grid of ``out_shape``.

    Target pixel ``(i, j)`` lies at offset ``(i, j) - origin`` from the shape centre; it takes
    the source value at a random foreground pixel of the source plus that offset, rotated
    by U(-pi/4, pi/4) and scaled by ``1 + Exp(0.1)`` or its inverse (bilinear).
    """
    src = np.asarray(source, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"source images must be 2D, got shape {src.shape}")
    fg = np.flatnonzero(src > src.min())
    pick = int(fg[rng.integers(fg.size)]) if fg.size else int(rng.integers(src.size))
    centre = np.array(np.unravel_index(pick, src.shape), np.float64)
    angle = rng.uniform(-np.pi / 4, np.pi / 4)
    scale = 1.0 + rng.exponential(0.1)
    if rng.random() < 0.5:
        scale = 1.0 / scale
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    dr = np.arange(out_shape[0], dtype=np.float64)[:, None] - origin[0]
    dc = np.arange(out_shape[1], dtype=np.float64)[None, :] - origin[1]
    rows = centre[0] + cos * dr - sin * dc
    cols = centre[1] + sin * dr + cos * dc
    return map_coordinates(src, [rows, cols], order=1, mode="mirror")


def poisson_task(
    image: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    sources: Sources,
    *,
    size: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend a patch of a source image into a random shape with mixed gradients."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    shape = draw_shape(foreground, rng, size=size)
    src = _draw_source(sources, rng, image)
    r0, r1, c0, c1 = shape.box  # solve box = shape box + 1 pixel, on a 1-pixel edge-padded image
    padded = np.pad(img, 1, mode="edge")
    target = padded[r0 : r1 + 2, c0 : c1 + 2]
    region = np.pad(shape.mask[r0:r1, c0:c1], 1)
    origin = (shape.centre[0] - r0 + 1, shape.centre[1] - c0 + 1)
    patch = sample_source_patch(src, target.shape, origin, rng)
    blended = np.clip(blend(target, patch, region), lo, hi)[1:-1, 1:-1]
    out = img.copy()
    inside = shape.mask[r0:r1, c0:c1]
    out[r0:r1, c0:c1][inside] = blended[inside]
    mask = shape.mask.copy()
    return out, mask
