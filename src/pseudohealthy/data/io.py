"""NIfTI in and out: validated loading into canonical RAS+ and writing back in the source grid."""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornts

from pseudohealthy.data.files import atomic_write, is_temporary_name
from pseudohealthy.errors import ScanError, ScanWarning

MAX_DIM = 2048
MAX_VOXELS = 512**3
MIN_SPACING = 1e-3  # voxel sizes outside [MIN_SPACING, MAX_SPACING] (file units) are refused
MAX_SPACING = 100.0
_NIFTI_HEADER_BYTES = 348
_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, MemoryError, nib.filebasedimages.ImageFileError)


@dataclass
class Volume:
    """A scan held in canonical RAS+ orientation; axial slice k is ``data[:, :, k]``."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    source_affine: np.ndarray
    source_shape: tuple[int, int, int]
    path: Path | None = None
    name: str = field(default="")

    def __post_init__(self) -> None:
        if not self.name:
            self.name = scan_name(self.path) if self.path is not None else "array"

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes of the canonical array (file units, usually mm)."""
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)


def scan_name(path: str | Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = Path(path).name
    for ext in NIFTI_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


NIFTI_SUFFIXES = (".nii.gz", ".nii")
"""File name endings of NIfTI files (the only rule of what counts as one)."""


def is_nifti_name(path: str | Path) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` name that is not a temporary name of an unfinished write."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES) and not is_temporary_name(path)


def _open_image(path: Path) -> nib.spatialimages.SpatialImage:
    """nib.load with the usual failure modes turned into one-line ScanErrors."""
    if not path.exists():
        raise ScanError(path, "file not found")
    if path.is_dir():
        raise ScanError(path, "is a directory, not a NIfTI file")
    if not is_nifti_name(path):
        raise ScanError(path, "not a NIfTI file (expected a .nii or .nii.gz name)")
    if path.name.lower().endswith(".gz"):
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                raise ScanError(path, "not a NIfTI file (named .nii.gz but not gzip-compressed)")
    try:
        img = nib.load(path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ScanError(path, f"truncated or corrupt file ({_one_line(exc)})") from exc
    except Exception as exc:
        raise ScanError(path, _unreadable(path, exc)) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise ScanError(path, f"not a NIfTI file (read as {type(img).__name__})")
    return img


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())


def _unreadable(path: Path, exc: BaseException) -> str:
    """Explain why nibabel could not open ``path``: truncated, too short, or not NIfTI."""
    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as fh:
            head = fh.read(_NIFTI_HEADER_BYTES)
    except (EOFError, OSError, zlib.error):
        return "truncated or corrupt file (compressed data ended early)"
    if len(head) < _NIFTI_HEADER_BYTES:
        return f"truncated or not a NIfTI file (only {len(head)} bytes, a NIfTI header needs 348)"
    if isinstance(exc, nib.filebasedimages.ImageFileError):
        return "not a NIfTI file (no valid NIfTI header)"
    return f"not a readable NIfTI file ({_one_line(exc)})"


def _spatial_shape(img: nib.spatialimages.SpatialImage, path: Path | None) -> tuple[int, int, int]:
    """Validate the stored shape (2D, 4D, sizes) before any voxel is read."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise ScanError(path, f"is {len(shape)}D (shape {shape}); a 3D volume is needed")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise ScanError(
            path, f"is {len(shape)}D with {int(np.prod(extra))} volumes (shape {shape}); give one 3D volume"
        )
    shape3 = shape[:3]
    if any(s < 1 for s in shape3):
        raise ScanError(path, f"has an empty dimension (shape {shape3})")
    if max(shape3) > MAX_DIM or int(np.prod(shape3, dtype=np.int64)) > MAX_VOXELS:
        raise ScanError(
            path, f"absurd size {shape3} (limits: {MAX_DIM} per axis, {MAX_VOXELS} voxels in all)"
        )
    return shape3


def _check_dtype(dtype: np.dtype, path: Path | None) -> None:
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise ScanError(
            path, f"unsupported data type {dtype} (need real-valued scalar voxels, not RGB/complex)"
        )


def _check_affine(affine: np.ndarray, path: Path | None) -> None:
    if not np.all(np.isfinite(affine)):
        raise ScanError(path, "affine contains NaN or Inf")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if (
        np.any(spacing < MIN_SPACING)
        or np.any(spacing > MAX_SPACING)
        or abs(np.linalg.det(affine[:3, :3])) < 1e-12
    ):
        raise ScanError(
            path,
            f"absurd voxel spacing {tuple(round(float(s), 6) for s in spacing)} "
            f"(need {MIN_SPACING}..{MAX_SPACING} per axis and a non-degenerate affine)",
        )


def _check_values(data: np.ndarray, path: Path | None, *, constant_ok: bool = False) -> np.ndarray:
    """Replace NaN/Inf by the finite minimum (with a ScanWarning); refuse constant images."""
    bad = ~np.isfinite(data)
    n_bad = int(bad.sum())
    if n_bad:
        if n_bad == data.size:
            raise ScanError(path, "has no finite voxel (all NaN or Inf)")
        fill = float(data[~bad].min())
        data[bad] = fill
        where = path if path is not None else "array"
        warnings.warn(
            f"{where}: replaced {n_bad} NaN/Inf voxel(s) by the finite minimum {fill:g}",
            ScanWarning,
            stacklevel=3,
        )
    if not constant_ok and data.size and float(data.max()) == float(data.min()):
        raise ScanError(path, f"all voxels have the same value ({float(data.min()):g}); nothing to analyse")
    return data


def _check_slice_plane(shape: tuple[int, ...], path: Path | None) -> None:
    if shape[0] < 2 or shape[1] < 2:
        raise ScanError(
            path, f"axial slices would be {shape[0]}x{shape[1]} pixels (canonical shape {shape}); need >= 2x2"
        )


def _read(path: str | Path, *, constant_ok: bool) -> tuple[nib.Nifti1Image, np.ndarray, tuple[int, int, int]]:
    """Open, validate and read a NIfTI file; returns (image, float32 data as stored, 3D shape)."""
    path = Path(path)
    img = _open_image(path)
    shape3 = _spatial_shape(img, path)
    _check_dtype(img.header.get_data_dtype(), path)
    _check_affine(img.affine, path)
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32, caching="unchanged")).reshape(shape3)
    except MemoryError as exc:
        raise ScanError(path, f"not enough memory to read {shape3} voxels") from exc
    except _READ_ERRORS as exc:
        raise ScanError(path, f"truncated or corrupt file ({_one_line(exc)})") from exc
    except Exception as exc:
        raise ScanError(path, f"cannot read voxel data ({_one_line(exc)})") from exc
    data = _check_values(np.array(data, dtype=np.float32, copy=True), path, constant_ok=constant_ok)
    return img, data, shape3


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient an array (3D, or more with the extra axes last) to closest canonical RAS+.

    The one rule of canonical orientation in the project (that of nib.as_closest_canonical);
    returns the reoriented array and its affine.
    """
    ornt = ornts.io_orientation(affine)
    canon = ornts.apply_orientation(data, ornt)
    canon_affine = affine @ ornts.inv_ornt_aff(ornt, data.shape)
    return np.ascontiguousarray(canon), canon_affine


def load_scan(path: str | Path) -> Volume:
    """Load and validate a 3D NIfTI scan into canonical RAS+ float32.

    Raises ScanError naming the file and the problem; NaN/Inf voxels are replaced by the finite
    minimum with a ScanWarning.
    """
    path = Path(path)
    img, data, shape3 = _read(path, constant_ok=False)
    canon, canon_affine = to_canonical(data, img.affine)
    _check_slice_plane(canon.shape, path)
    header = img.header.copy()
    return Volume(canon, canon_affine, header, np.array(img.affine, dtype=float), shape3, path)


def load_mask(path: str | Path, like: Volume) -> np.ndarray:
    """Load a mask (voxels > 0.5 are in) as a canonical bool array on the grid of ``like``."""
    path = Path(path)
    img, data, _ = _read(path, constant_ok=True)
    canon, canon_affine = to_canonical(data, img.affine)
    if canon.shape != like.data.shape:
        raise ScanError(
            path,
            f"mask shape {canon.shape} does not match the scan's {like.data.shape} (canonical orientation)",
        )
    if not np.allclose(canon_affine, like.affine, atol=1e-2):
        warnings.warn(
            f"{path}: mask affine differs from the scan's; assuming the same voxel grid",
            ScanWarning,
            stacklevel=2,
        )
    return canon > 0.5


def volume_from_array(data: np.ndarray, affine: np.ndarray | None = None, name: str = "array") -> Volume:
    """Wrap an array (2D: one axial slice) with an affine (default identity) as a canonical Volume."""
    arr = np.array(data, dtype=np.float32, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ScanError(None, f"{name}: need a 2D or 3D array, got shape {arr.shape}")
    if max(arr.shape) > MAX_DIM or arr.size > MAX_VOXELS:
        raise ScanError(None, f"{name}: absurd size {arr.shape}")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
    _check_affine(affine, None)
    arr = _check_values(arr, None)
    img = nib.Nifti1Image(arr, affine)
    img.update_header()
    canon, canon_affine = to_canonical(arr, affine)
    _check_slice_plane(canon.shape, None)
    return Volume(canon, canon_affine, img.header.copy(), affine, tuple(arr.shape), None, name)


def to_source(array_canonical: np.ndarray, like: Volume) -> np.ndarray:
    """Reorient a canonical-frame array back to the stored orientation of ``like``."""
    arr = np.asarray(array_canonical)
    if arr.shape[:3] != like.data.shape:
        raise ValueError(f"array shape {arr.shape} does not match the volume's canonical {like.data.shape}")
    src = ornts.io_orientation(like.source_affine)
    back = ornts.ornt_transform(_RAS, src)
    out = ornts.apply_orientation(arr, back)
    assert out.shape[:3] == tuple(like.source_shape)
    return np.ascontiguousarray(out)


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind in "iu" and arr.dtype.kind == "f":
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    return arr.astype(dtype)


def save_like(
    array_canonical: np.ndarray,
    like: Volume,
    path: str | Path,
    *,
    dtype: np.dtype | type = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write a canonical-frame array in the exact grid, affine and header of ``like``.

    Values are stored as given (no scaling); integer dtypes are rounded and clipped. Never writes
    onto ``like.path``; refuses an existing file unless ``overwrite``; writes atomically.
    """
    path = Path(path)
    if not is_nifti_name(path):
        raise ScanError(path, "output must be named .nii or .nii.gz")
    if like.path is not None and (
        path.resolve() == Path(like.path).resolve() or (path.exists() and os.path.samefile(path, like.path))
    ):
        raise ScanError(path, "refusing to overwrite the input scan")
    if path.exists() and not overwrite:
        raise ScanError(path, "already exists (choose another name or allow overwriting)")
    arr = np.asarray(array_canonical)
    if arr.shape != like.data.shape:
        raise ScanError(path, f"array shape {arr.shape} does not match the scan's {like.data.shape}")
    dtype = np.dtype(np.uint8) if np.dtype(dtype) == np.bool_ else np.dtype(dtype)
    _check_dtype(dtype, path)
    src = _cast(to_source(arr, like), dtype)

    header = like.header.copy()
    header.set_data_dtype(src.dtype)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = 0.0
    header["cal_max"] = 0.0
    img_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = img_class(src, like.source_affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)

    try:
        atomic_write(path, lambda tmp: nib.save(img, tmp))
    except OSError as exc:
        raise ScanError(path, f"cannot write ({exc.strerror or exc})") from exc
    return path


def load_map(path: str | Path, like: Volume) -> np.ndarray:
    """A float map (e.g. ``*_anomaly.nii.gz``) in canonical orientation, checked against ``like``."""
    path = Path(path)
    try:
        img = nib.load(path)
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:
        raise ScanError(path, f"cannot read anomaly map ({type(exc).__name__}: {exc})") from exc
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    if data.ndim != 3:
        raise ScanError(path, f"anomaly map must be 3D, got shape {data.shape}")
    data, _ = to_canonical(data, img.affine)
    if data.shape != like.data.shape:
        raise ScanError(path, f"anomaly map shape {data.shape} does not match the scan's {like.data.shape}")
    if not np.all(np.isfinite(data)):
        raise ScanError(path, "anomaly map contains NaN or Inf")
    return data
