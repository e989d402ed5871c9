"""Poisson image editing: mixed-gradient guidance and an exact DST-I Poisson solver."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.fft import dstn
from scipy.ndimage import map_coordinates

from .shapes import draw_shape
from .style import DEFAULT_STYLE, check_style

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

MAX_PATCH_FRACTION = 0.8  # the reference's cap: the patch spans at most this much of the source
SOURCE_ORDER = {"reference": 3, "legacy": 1}  # spline order of the source resampling


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


def blend(
    target: np.ndarray, source: np.ndarray, region: np.ndarray, *, mixed: bool = True, whole: bool = False
) -> np.ndarray:
    """Poisson-blend ``source`` into ``target`` inside ``region`` (all three the same shape).

    The solve covers the whole array with the target as Dirichlet boundary on its outer
    ring; ``region`` must not touch that ring. Outside ``region`` the target is returned,
    unless ``whole``: then the solution everywhere (the reference's replaced box).
    """
    region = np.asarray(region, dtype=bool)
    if region[0].any() or region[-1].any() or region[:, 0].any() or region[:, -1].any():
        raise ValueError("the blend region must not touch the border of the solve box")
    div = guidance_divergence(target, source, region, mixed=mixed)
    u = poisson_solve(div, target)
    return u if whole else np.where(region, u, target)


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
    *,
    order: int = SOURCE_ORDER[DEFAULT_STYLE],
    max_fraction: float | None = MAX_PATCH_FRACTION,
) -> np.ndarray:
    """Resample a patch of ``source`` onto a target grid of ``out_shape``.

    Target pixel ``(i, j)`` lies at offset ``(i, j) - origin`` from the shape centre; it takes
    the source value at a random foreground pixel of the source plus that offset, rotated
    by U(-pi/4, pi/4) and scaled by ``1 + Exp(0.1)`` or its inverse, the scale capped so the
    patch spans at most ``max_fraction`` of the source (None: no cap); spline ``order``.
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
    if max_fraction is not None:
        scale = min(scale, max_fraction * min(src.shape) / max(out_shape))
    cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
    dr = np.arange(out_shape[0], dtype=np.float64)[:, None] - origin[0]
    dc = np.arange(out_shape[1], dtype=np.float64)[None, :] - origin[1]
    rows = centre[0] + cos * dr - sin * dc
    cols = centre[1] + sin * dr + cos * dc
    return _resample(src, rows, cols, order)


def _resample(src: np.ndarray, rows: np.ndarray, cols: np.ndarray, order: int) -> np.ndarray:
    """``map_coordinates`` (mirror mode) on a crop around the coordinates when they lie inside.

    The crop keeps a margin of 8 pixels, where the cubic prefilter's reach has decayed to
    about 3e-5 of a pixel's value; the spline is then fitted to far fewer pixels.
    """
    m = 8
    r0, r1 = int(np.floor(rows.min())) - m, int(np.ceil(rows.max())) + m + 1
    c0, c1 = int(np.floor(cols.min())) - m, int(np.ceil(cols.max())) + m + 1
    if order > 1 and r0 >= 0 and c0 >= 0 and r1 <= src.shape[0] and c1 <= src.shape[1]:
        return map_coordinates(src[r0:r1, c0:c1], [rows - r0, cols - c0], order=order, mode="mirror")
    return map_coordinates(src, [rows, cols], order=order, mode="mirror")


def poisson_task(
    image: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    sources: Sources,
    *,
    size: float | None = None,
    style: str = DEFAULT_STYLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend a patch of a source image into a random shape with mixed gradients.

    ``reference``: cubic source sampling, the patch's scale capped, and the whole solved box
    replaced (pixels of the box outside the shape change a little); ``legacy``: bilinear,
    no cap, only the shape replaced. The returned mask is the shape.
    """
    style = check_style(style)
    img = np.asarray(image, dtype=np.float32)
    lo, hi = float(img.min()), float(img.max())
    shape = draw_shape(foreground, rng, size=size, style=style)
    src = _draw_source(sources, rng, image)
    r0, r1, c0, c1 = shape.box  # solve box = shape box + 1 pixel, on a 1-pixel edge-padded image
    padded = np.pad(img, 1, mode="edge")
    target = padded[r0 : r1 + 2, c0 : c1 + 2]
    region = np.pad(shape.mask[r0:r1, c0:c1], 1)
    origin = (shape.centre[0] - r0 + 1, shape.centre[1] - c0 + 1)
    reference = style == "reference"
    cap = MAX_PATCH_FRACTION if reference else None
    patch = sample_source_patch(src, target.shape, origin, rng, order=SOURCE_ORDER[style], max_fraction=cap)
    blended = np.clip(blend(target, patch, region, whole=reference), lo, hi)[1:-1, 1:-1]
    out = img.copy()
    if reference:
        out[r0:r1, c0:c1] = blended
    else:
        inside = shape.mask[r0:r1, c0:c1]
        out[r0:r1, c0:c1][inside] = blended[inside]
    return out, shape.mask.copy()
