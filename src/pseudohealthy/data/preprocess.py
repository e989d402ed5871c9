"""Into the model frame and back: foreground, intensity normalisation, square 2D slice geometry."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from skimage.transform import resize

from pseudohealthy.data.io import Volume
from pseudohealthy.data.norms import NORMS
from pseudohealthy.errors import PseudohealthyError, ScanError, ScanWarning

ZERO_BELOW = 1e-4  # normalised values below this are set to 0 (as in the benchmark)
MIN_IMAGE_SIZE = 16  # model-frame slice sizes (pixels) the commands accept ...
MAX_IMAGE_SIZE = 1024  # ... and the largest any SliceGeometry accepts (checked before allocating)
OUTLIER_FACTOR = 5.0  # a maximum this many times the high percentile's distance above the minimum ...
OUTLIER_PERCENTILE = 99.9  # ... (this percentile of the foreground) is an outlier (see outlier_maximum)
MEDIAN_SPAN = 3.3  # "median": the foreground median sits at 1 / MEDIAN_SPAN of [0, 1] (see normalise)
MAX_FOV_MM = 2000.0  # largest field of view (mm) a member may record (checked before use)
MAX_SIDE_FACTOR = 4  # a field of view pads a slice to at most this many times its larger side
_REL_TOL = 1e-4  # tolerance above the minimum, relative to the intensity range
_CONST_TOL = 1e-6  # tolerance around an exact constant background, relative to the range
_F32_SAFE = float(np.finfo(np.float32).max) / 4  # intensities or ranges beyond: arithmetic in float64


class ImageSizeError(PseudohealthyError, ValueError):
    """A model-frame slice size outside ``MIN_IMAGE_SIZE..MAX_IMAGE_SIZE``."""


def check_image_size(size: int, what: str = "size") -> int:
    """The rule of model-frame slice sizes: an integer in ``MIN_IMAGE_SIZE..MAX_IMAGE_SIZE``.

    Commands check a requested size with it before reading or allocating anything; ``what``
    names the setting in the message (e.g. ``"--size"``). Returns the size as an int.
    """
    ok = isinstance(size, int | np.integer) and not isinstance(size, bool)
    if not ok or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ImageSizeError(
            f"{what} must be an image size from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {size!r}"
        )
    return int(size)


def _wide(*values: float) -> bool:
    """True when intensities this large could overflow float32 arithmetic (use float64)."""
    return max(abs(float(v)) for v in values) >= _F32_SAFE


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
    with np.errstate(over="ignore"):  # |x - bg| beyond float32 is inf: still "away from bg"
        return np.abs(data - bg) > _CONST_TOL * (hi - lo)


@dataclass(frozen=True)
class NormParams:
    """Linear intensity map ``normalised = (x - lo) / (hi - lo)``; ``background`` fills outside fg.

    Computed in float32, or in float64 where ``lo``, ``hi`` or the range come near the float32
    limit (a finite scan near +-3e38 would otherwise overflow to Inf and NaN).
    """

    method: str
    lo: float
    hi: float
    background: float

    @property
    def _dtype(self) -> type:
        return np.float64 if _wide(self.lo, self.hi, self.hi - self.lo) else np.float32

    def apply(self, data: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """``data`` to float32 in [0, 1]: values below 1e-4 and outside ``foreground`` become 0."""
        dt = self._dtype
        with np.errstate(over="ignore"):  # values far outside [lo, hi] become +-inf, then clipped
            out = (np.asarray(data, dtype=dt) - dt(self.lo)) / dt(self.hi - self.lo)
        out = np.clip(out, 0.0, 1.0)
        out[out < ZERO_BELOW] = 0.0
        out[~foreground] = 0.0
        return out.astype(np.float32, copy=False)

    def invert(self, arr: np.ndarray) -> np.ndarray:
        """Normalised values back to the scan's intensity units (float32)."""
        dt = self._dtype
        return (np.asarray(arr, dtype=dt) * dt(self.hi - self.lo) + dt(self.lo)).astype(np.float32)


def norm_params(
    data: np.ndarray,
    foreground: np.ndarray,
    method: str = NORMS[0],
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
        wide = _wide(values.min(), values.max())
        lo, hi = (float(v) for v in np.percentile(values.astype(np.float64) if wide else values, percentiles))
    elif method == "median":
        lo = min(float(values.min()), bg)
        wide = _wide(values.min(), values.max(), bg)
        med = float(np.median(values.astype(np.float64) if wide else values))
        hi = min(lo + MEDIAN_SPAN * (med - lo), float(np.finfo(np.float32).max))  # invertible in float32
    else:
        raise ValueError(f"unknown normalisation {method!r} (use one of {', '.join(NORMS)})")
    if not hi > lo:
        hi = lo + max(1.0, abs(lo) * 1e-6)
    return NormParams(method, lo, hi, bg)


def outlier_maximum(values: np.ndarray, lo: float) -> tuple[float, float, float] | None:
    """The rule of an outlying maximum: ``(max, p, ratio)`` or None.

    ``p`` is the :data:`OUTLIER_PERCENTILE` of ``values`` (a scan's foreground), ``ratio`` is
    ``(max - lo) / (p - lo)``; an outlier when the ratio exceeds :data:`OUTLIER_FACTOR`. On the
    project's 64 real scans (BraTS, MSLUB, IXI, MNI152) the ratio is at most 3.0; one voxel of
    100 in a scan whose maximum is 4.5 gives 23.
    """
    values = np.asarray(values).ravel()
    if values.size == 0:
        return None
    top = float(values.max())
    wide = _wide(values.min(), top, lo)
    p = float(np.percentile(values.astype(np.float64) if wide else values, OUTLIER_PERCENTILE))
    if not p > lo:
        return None
    ratio = (top - lo) / (p - lo)
    return (top, p, ratio) if ratio > OUTLIER_FACTOR else None


def normalise(
    data: np.ndarray,
    foreground: np.ndarray,
    method: str = NORMS[0],
    *,
    percentiles: tuple[float, float] = (1.0, 99.0),
) -> np.ndarray:
    """Intensities to float32 in [0, 1], 0 outside the foreground.

    ``"max"``: the benchmark's divide-by-maximum with the minimum shifted to 0,
    ``(x - min) / (max - min)``; values below 1e-4 become 0. ``"percentile"``: clip to the
    foreground's ``percentiles`` then scale to [0, 1]. ``"median"``: the minimum shifted to 0 as
    in ``"max"``, divided by :data:`MEDIAN_SPAN` times the foreground median's distance above it,
    clipped at 1: the bulk of the tissue sits at the same level whatever the scan's brightest
    voxels (on the BraTS 2013 training volumes 0003-0005 the ``"max"`` map puts the foreground
    median at 0.28-0.32, mean 0.30 = 1 / 3.3), and hyperintensities up to 3.3 times that level
    keep their contrast.
    """
    return norm_params(data, foreground, method, percentiles).apply(data, foreground)


@dataclass(frozen=True)
class SliceGeometry:
    """One axial slice ``in_shape`` (H, W) <-> model frame (size, size).

    ``square="pad"`` centre-pads to a square (lossless), ``"crop"`` centre-crops; a square side of
    at least ``min_side`` pixels (a field of view: see :func:`fov_side`) pads further. Then resizes
    with anti-aliasing when shrinking. Images may be (H, W) or a stack (N, H, W).
    """

    in_shape: tuple[int, int]
    size: int
    square: str = "pad"
    min_side: int = 0

    def __post_init__(self) -> None:
        if self.square not in ("pad", "crop"):
            raise ValueError(f"square must be 'pad' or 'crop', not {self.square!r}")
        if self.size < 2 or min(self.in_shape) < 1:
            raise ValueError(f"bad geometry: in_shape {self.in_shape}, size {self.size}")
        if not 0 <= self.min_side <= MAX_SIDE_FACTOR * max(self.in_shape):
            raise ValueError(f"min_side {self.min_side} outside 0..{MAX_SIDE_FACTOR} x {max(self.in_shape)}")
        if self.size > MAX_IMAGE_SIZE:
            raise ImageSizeError(
                f"model-frame size {self.size} is above the limit of {MAX_IMAGE_SIZE} pixels"
            )

    @property
    def side(self) -> int:
        """The square's side before resizing: the larger (``"pad"``) or smaller (``"crop"``) side
        of the slice, at least ``min_side``."""
        base = max(self.in_shape) if self.square == "pad" else min(self.in_shape)
        return max(base, self.min_side)

    def _windows(self) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """``(in the slice, in the square)``: the centred window the two share on each axis
        (a shorter axis is padded, a longer one cropped)."""
        src, dst = [], []
        for n in self.in_shape:
            common = min(n, self.side)
            a, b = max(0, (n - self.side) // 2), max(0, (self.side - n) // 2)
            src.append(slice(a, a + common))
            dst.append(slice(b, b + common))
        return (src[0], src[1]), (dst[0], dst[1])

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
        src, dst = self._windows()
        sq = np.full((self.side, self.side, stack.shape[2]), fill, dtype=stack.dtype)
        sq[dst] = stack[src]
        out = np.moveaxis(self._resize(sq, self.size, order), -1, 0)
        return out[0] if img.ndim == 2 else out

    def from_model(self, img: np.ndarray, order: int = 1, *, fill: float = 0.0) -> np.ndarray:
        """(size, size) or (N, size, size) back to ``in_shape``; outside a crop gets ``fill``."""
        img = np.asarray(img)
        stack = np.moveaxis(self._check(img, (self.size, self.size)), 0, -1)
        sq = self._resize(stack, self.side, order)
        src, dst = self._windows()
        out = np.full((*self.in_shape, sq.shape[2]), fill, dtype=sq.dtype)
        out[src] = sq[dst]
        out = np.ascontiguousarray(np.moveaxis(out, -1, 0))
        return out[0] if img.ndim == 2 else out

    @staticmethod
    def _check(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        if img.ndim not in (2, 3) or tuple(img.shape[-2:]) != tuple(shape):
            raise ValueError(f"expected shape {tuple(shape)} or (N, *{tuple(shape)}), got {img.shape}")
        return img[None] if img.ndim == 2 else img


def fov_side(fov_mm: float | None, spacing: tuple[float, ...], in_shape: tuple[int, int]) -> int:
    """Pixels of a square of ``fov_mm`` millimetres at the slice's in-plane ``spacing`` (0: none).

    Members record the field of view of their training slices (``fov_mm``), so that a scan cropped
    tighter than them is padded to the same physical scale in the model frame instead of being
    magnified; capped at :data:`MAX_SIDE_FACTOR` times the slice's larger side.
    """
    fov = check_fov(fov_mm)
    if fov is None:
        return 0
    return min(round(fov / float(np.mean(spacing[:2]))), MAX_SIDE_FACTOR * max(in_shape))


def check_fov(fov_mm: object) -> float | None:
    """The rule of a recorded field of view: None, or a number of mm in (0, :data:`MAX_FOV_MM`]
    (anything else is a ValueError)."""
    if fov_mm is None:
        return None
    number = isinstance(fov_mm, int | float) and not isinstance(fov_mm, bool)
    if not (number and 0.0 < fov_mm <= MAX_FOV_MM):
        raise ValueError(f"field of view {fov_mm!r} mm outside (0, {MAX_FOV_MM:g}]")
    return float(fov_mm)


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


def _warn_outlier(volume: Volume, data: np.ndarray, fg: np.ndarray, params: NormParams) -> None:
    """ScanWarning when divide-by-maximum normalisation is set by an outlying maximum."""
    found = outlier_maximum(data[fg], params.lo) if fg.any() else None
    if found is None:
        return
    top, p, ratio = found
    where = volume.path if volume.path is not None else volume.name
    warnings.warn(
        f"{where}: the maximum {top:g} lies {ratio:.3g}x as far above the minimum as the foreground's "
        f"{OUTLIER_PERCENTILE:g}th percentile ({p:g}): an outlier voxel? it sets the divide-by-maximum "
        "normalisation of the whole scan; percentile normalisation (norm='percentile') would clip it",
        ScanWarning,
        stacklevel=3,
    )


def _no_slice_problem(data: np.ndarray, need: int, brain_mask: np.ndarray | None) -> str:
    """Why no axial slice has ``need`` foreground pixels (an outlier hides the foreground?)."""
    problem = f"no axial slice has at least {need} foreground pixels"
    found = outlier_maximum(data, float(data.min())) if brain_mask is None else None
    if found is None:
        return problem
    top, p, ratio = found
    return (
        f"{problem}: its maximum {top:g} lies {ratio:.3g}x as far above the minimum as the "
        f"{OUTLIER_PERCENTILE:g}th percentile ({p:g}), which hides the foreground; an outlier voxel or "
        "corrupt data? fix or clip the scan, or give a brain mask"
    )


def prepare_scan(
    volume: Volume,
    *,
    size: int = 128,
    brain_mask: np.ndarray | None = None,
    norm: str = NORMS[0],
    square: str = "pad",
    min_foreground: float = 0.01,
    percentiles: tuple[float, float] = (1.0, 99.0),
    fov_mm: float | None = None,
) -> PreparedScan:
    """Normalise a canonical volume and bring its foreground axial slices into the model frame.

    ``min_foreground`` below 1 is a fraction of the slice's pixels, otherwise a pixel count.
    With ``norm="max"``, a maximum far above the rest of the foreground (:func:`outlier_maximum`)
    gives a ScanWarning; a normalisation that is not finite is a ScanError. ``fov_mm``: pad each
    slice to at least that field of view (:func:`fov_side`).
    """
    data = volume.data
    in_shape = (data.shape[0], data.shape[1])
    geometry = SliceGeometry(in_shape, size, square, fov_side(fov_mm, volume.spacing, in_shape))
    fg = foreground_mask(data, brain_mask)
    need = _min_pixels(min_foreground, data.shape[0] * data.shape[1])
    indices = np.flatnonzero(fg.sum(axis=(0, 1)) >= need)
    if indices.size == 0:
        raise ScanError(volume.path, _no_slice_problem(data, need, brain_mask))
    params = norm_params(data, fg, norm, percentiles)
    if norm == "max":
        _warn_outlier(volume, data, fg, params)
    normalised = params.apply(data, fg)
    if not np.isfinite(normalised).all():
        raise ScanError(
            volume.path,
            f"normalisation is not finite (intensities {params.lo:g} to {params.hi:g}): unusable range",
        )
    stack = np.moveaxis(normalised[:, :, indices], -1, 0)
    images = np.clip(geometry.to_model(stack), 0.0, 1.0).astype(np.float32)
    masks = geometry.to_model(np.moveaxis(fg[:, :, indices], -1, 0))
    return PreparedScan(volume, normalised, fg, indices, images, masks, geometry, params)
