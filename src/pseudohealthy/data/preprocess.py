"""Into the model frame and back: foreground, intensity normalisation, square 2D slice geometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.transform import resize

from pseudohealthy.data.io import Volume
from pseudohealthy.errors import ScanError

ZERO_BELOW = 1e-4  # normalised values below this are set to 0 (as in the benchmark)
_REL_TOL = 1e-4  # tolerance above the minimum, relative to the intensity range
_CONST_TOL = 1e-6  # tolerance around an exact constant background, relative to the range


def background_value(data: np.ndarray) -> float:
    """The scan's background intensity.

    The exact constant that fills most of the array's border when there is one (0 around MSLUB
    brains, which hold small negative values inside), else the image minimum.
    """
    data = np.asarray(data)
    lo = float(data.min())
    faces = [np.take(data, i, axis=ax).ravel() for ax in range(data.ndim) for i in (0, -1)]
    border = np.concatenate(faces)
    values, counts = np.unique(border, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] >= 0.5 * border.size:
        return float(values[best])
    return lo


def foreground_mask(data: np.ndarray, brain_mask: np.ndarray | None = None) -> np.ndarray:
    """Foreground: voxels away from the background value (above the minimum, small tolerance).

    No ``> 0`` assumption: works for BraTS' negative constant background and for MSLUB's negative
    values inside the brain. An explicit ``brain_mask`` wins when given.
    """
    data = np.asarray(data)
    if brain_mask is not None:
        brain_mask = np.asarray(brain_mask)
        if brain_mask.shape != data.shape:
            raise ValueError(f"brain mask shape {brain_mask.shape} does not match data shape {data.shape}")
        return brain_mask.astype(bool)
    lo, hi = float(data.min()), float(data.max())
    tol = _REL_TOL * (hi - lo)
    bg = background_value(data)
    if bg - lo <= tol:
        return data > lo + tol
    return np.abs(data - bg) > _CONST_TOL * (hi - lo)


@dataclass(frozen=True)
class NormParams:
    """Linear intensity map ``normalised = (x - lo) / (hi - lo)``; ``background`` fills outside fg."""

    method: str
    lo: float
    hi: float
    background: float

    def apply(self, data: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        out = (np.asarray(data, dtype=np.float32) - np.float32(self.lo)) / np.float32(self.hi - self.lo)
        out = np.clip(out, 0.0, 1.0)
        out[out < ZERO_BELOW] = 0.0
        out[~foreground] = 0.0
        return out.astype(np.float32, copy=False)

    def invert(self, arr: np.ndarray) -> np.ndarray:
        return (
            np.asarray(arr, dtype=np.float32) * np.float32(self.hi - self.lo) + np.float32(self.lo)
        ).astype(np.float32)


def norm_params(
    data: np.ndarray,
    foreground: np.ndarray,
    method: str = "max",
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> NormParams:
    """Parameters of :func:`normalise` for ``data`` (see there)."""
    data = np.asarray(data)
    fg = np.asarray(foreground, dtype=bool)
    values = data[fg] if fg.any() else data.ravel()
    bg = background_value(data)
    if method == "max":
        lo, hi = min(float(values.min()), bg), float(values.max())
    elif method == "percentile":
        lo, hi = (float(v) for v in np.percentile(values, percentiles))
    else:
        raise ValueError(f"unknown normalisation {method!r} (use 'max' or 'percentile')")
    if not hi > lo:
        hi = lo + 1.0
    return NormParams(method, lo, hi, bg)


def normalise(
    data: np.ndarray,
    foreground: np.ndarray,
    method: str = "max",
    *,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """Intensities to float32 in [0, 1], 0 outside the foreground.

    ``"max"``: the benchmark's divide-by-maximum with the minimum shifted to 0,
    ``(x - min) / (max - min)``; values below 1e-4 become 0. ``"percentile"``: clip to the
    foreground's ``percentiles`` then scale to [0, 1].
    """
    return norm_params(data, foreground, method, percentiles).apply(data, foreground)


@dataclass(frozen=True)
class SliceGeometry:
    """One axial slice ``in_shape`` (H, W) <-> model frame (size, size).

    ``square="pad"`` centre-pads to a square (lossless), ``"crop"`` centre-crops; then resizes with
    anti-aliasing when shrinking. Images may be (H, W) or a stack (N, H, W).
    """

    in_shape: tuple[int, int]
    size: int
    square: str = "pad"

    def __post_init__(self) -> None:
        if self.square not in ("pad", "crop"):
            raise ValueError(f"square must be 'pad' or 'crop', not {self.square!r}")
        if self.size < 2 or min(self.in_shape) < 1:
            raise ValueError(f"bad geometry: in_shape {self.in_shape}, size {self.size}")

    @property
    def side(self) -> int:
        return max(self.in_shape) if self.square == "pad" else min(self.in_shape)

    def _offsets(self) -> tuple[int, int]:
        h, w = self.in_shape
        return abs(self.side - h) // 2, abs(self.side - w) // 2

    def _resize(self, img: np.ndarray, out: int, order: int) -> np.ndarray:
        """Resize the first two axes of (h, w, N) to (out, out)."""
        is_bool = img.dtype == bool
        src = img.astype(np.float32) if is_bool or img.dtype.kind != "f" else img
        shrink = out < img.shape[0] or out < img.shape[1]
        res = resize(
            src,
            (out, out, *img.shape[2:]),
            order=order,
            mode="edge",
            anti_aliasing=bool(shrink and order > 0),
            preserve_range=True,
        )
        return (res > 0.5) if is_bool else res.astype(np.float32, copy=False)

    def to_model(self, img: np.ndarray, order: int = 1, *, fill: float = 0.0) -> np.ndarray:
        """(H, W) or (N, H, W) -> (size, size) or (N, size, size); pad regions get ``fill``."""
        img = np.asarray(img)
        stack = np.moveaxis(self._check(img, self.in_shape), 0, -1)  # (H, W, N)
        h, w = self.in_shape
        oy, ox = self._offsets()
        if self.square == "pad":
            sq = np.full((self.side, self.side, stack.shape[2]), fill, dtype=stack.dtype)
            sq[oy : oy + h, ox : ox + w] = stack
        else:
            sq = stack[oy : oy + self.side, ox : ox + self.side]
        out = np.moveaxis(self._resize(sq, self.size, order), -1, 0)
        return out[0] if img.ndim == 2 else out

    def from_model(self, img: np.ndarray, order: int = 1, *, fill: float = 0.0) -> np.ndarray:
        """(size, size) or (N, size, size) back to ``in_shape``; outside a crop gets ``fill``."""
        img = np.asarray(img)
        stack = np.moveaxis(self._check(img, (self.size, self.size)), 0, -1)
        sq = self._resize(stack, self.side, order)
        h, w = self.in_shape
        oy, ox = self._offsets()
        if self.square == "pad":
            out = sq[oy : oy + h, ox : ox + w]
        else:
            out = np.full((h, w, sq.shape[2]), fill, dtype=sq.dtype)
            out[oy : oy + self.side, ox : ox + self.side] = sq
        out = np.ascontiguousarray(np.moveaxis(out, -1, 0))
        return out[0] if img.ndim == 2 else out

    @staticmethod
    def _check(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        if img.ndim not in (2, 3) or tuple(img.shape[-2:]) != tuple(shape):
            raise ValueError(f"expected shape {tuple(shape)} or (N, *{tuple(shape)}), got {img.shape}")
        return img[None] if img.ndim == 2 else img


@dataclass
class PreparedScan:
    """A scan in the model frame: normalised canonical volume plus its foreground axial slices."""

    volume: Volume
    normalised: np.ndarray
    foreground: np.ndarray
    indices: np.ndarray
    images: np.ndarray
    masks: np.ndarray
    geometry: SliceGeometry
    norm: NormParams

    def to_volume(self, slices: np.ndarray, fill: float = 0.0, order: int = 1) -> np.ndarray:
        """Model-frame slices (N, size, size), one per ``indices``, back into the canonical grid.

        Axial slices not in ``indices`` get ``fill``. Bool slices give a bool volume.
        """
        slices = np.asarray(slices)
        expected = (len(self.indices), self.geometry.size, self.geometry.size)
        if slices.shape != expected:
            raise ValueError(f"expected slices of shape {expected}, got {slices.shape}")
        back = self.geometry.from_model(slices, order, fill=fill)  # (N, X, Y)
        dtype = bool if slices.dtype == bool else np.float32
        out = np.full(self.volume.data.shape, fill, dtype=dtype)
        out[:, :, self.indices] = np.moveaxis(back, 0, -1)
        return out

    def denormalise(self, arr: np.ndarray) -> np.ndarray:
        """Back to the scan's original intensity units.

        An array of the canonical volume shape gets the scan's background value outside the
        foreground, so ``denormalise(normalised)`` reproduces the scan (up to values clipped by the
        normalisation).
        """
        out = self.norm.invert(arr)
        if out.shape == self.foreground.shape:
            out[~self.foreground] = self.norm.background
        return out


def _min_pixels(min_foreground: float, n_pixels: int) -> int:
    if min_foreground < 0:
        raise ValueError("min_foreground must be >= 0")
    if min_foreground < 1:
        return max(1, int(np.ceil(min_foreground * n_pixels)))
    return int(min_foreground)


def prepare_scan(
    volume: Volume,
    *,
    size: int = 128,
    brain_mask: np.ndarray | None = None,
    norm: str = "max",
    square: str = "pad",
    min_foreground: float = 0.01,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> PreparedScan:
    """Normalise a canonical volume and bring its foreground axial slices into the model frame.

    ``min_foreground`` below 1 is a fraction of the slice's pixels, otherwise a pixel count.
    """
    data = volume.data
    fg = foreground_mask(data, brain_mask)
    params = norm_params(data, fg, norm, percentiles)
    normalised = params.apply(data, fg)
    geometry = SliceGeometry((data.shape[0], data.shape[1]), size, square)
    need = _min_pixels(min_foreground, data.shape[0] * data.shape[1])
    indices = np.flatnonzero(fg.sum(axis=(0, 1)) >= need)
    if indices.size == 0:
        raise ScanError(volume.path, f"no axial slice has at least {need} foreground pixels")
    stack = np.moveaxis(normalised[:, :, indices], -1, 0)
    images = np.clip(geometry.to_model(stack), 0.0, 1.0).astype(np.float32)
    masks = geometry.to_model(np.moveaxis(fg[:, :, indices], -1, 0))
    return PreparedScan(volume, normalised, fg, indices, images, masks, geometry, params)
