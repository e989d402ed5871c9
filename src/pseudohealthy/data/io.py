"""NIfTI in and out: validated loading into canonical RAS+ and writing back in the source grid.

``load_scan`` also reads a folder holding one DICOM series (or ``folder::SERIES``; the reading is
:mod:`pseudohealthy.data.dicom`'s): the same validation and canonical Volume, with a NIfTI header
built for the series' own grid so that ``save_like`` writes NIfTI outputs in its geometry.
"""

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

from pseudohealthy.data import dicom
from pseudohealthy.data.files import atomic_write, is_temporary_name
from pseudohealthy.errors import ScanError, ScanWarning

MAX_DIM = 2048
MAX_VOXELS = 512**3
MIN_SPACING = 1e-3  # voxel sizes outside [MIN_SPACING, MAX_SPACING] (file units) are refused
MAX_SPACING = 100.0
MAX_NONFINITE_FRACTION = 0.5  # more NaN/Inf voxels than this is refused (unless a NaN background)
_NIFTI_HEADER_BYTES = 348
_CHUNK = 1 << 20  # bytes per read when draining a gzip stream to its checksum
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
    """File name without ``.nii`` / ``.nii.gz`` (a DICOM source: :func:`dicom.series_name`)."""
    name = Path(path).name
    if dicom.SERIES_SEPARATOR in name:
        return dicom.series_name(path)
    for ext in NIFTI_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


NIFTI_SUFFIXES = (".nii.gz", ".nii")
"""File name endings of NIfTI files (the only rule of what counts as one)."""


def is_nifti_name(path: str | Path) -> bool:
    """True for a ``.nii`` / ``.nii.gz`` name that is not a temporary name of an unfinished write."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES) and not is_temporary_name(path)


def is_dicom_source(path: str | Path) -> bool:
    """True for a DICOM series source: a folder (not one named like NIfTI), or ``folder::SERIES``.

    Says nothing about the folder's contents (reading it does): ``load_scan`` reads such a path as
    a DICOM series.
    """
    folder, selector = dicom.split_series(path)
    if selector is not None:
        return True
    return folder.is_dir() and not is_nifti_name(folder)


def scan_exists(path: str | Path) -> bool:
    """True when a scan source is there: a file, or the folder of a DICOM series (``folder::SERIES``
    names its folder)."""
    folder, _ = dicom.split_series(path)
    return folder.exists()


def is_dicom_folder(path: str | Path) -> bool:
    """True for a folder that holds DICOM files (:func:`dicom.has_dicom_files`; cheap): scan
    discovery takes such a folder as ONE scan, not as a folder of scans."""
    path = Path(path)
    return path.is_dir() and not is_nifti_name(path) and dicom.has_dicom_files(path)


def _probe(path: Path) -> bytes:
    """The first two bytes of ``path``; an unreadable or empty file is a one-line ScanError."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except PermissionError as exc:
        raise ScanError(path, "permission denied (cannot read the file)") from exc
    except OSError as exc:
        raise ScanError(path, f"cannot read the file ({exc.strerror or _one_line(exc)})") from exc
    if not head:
        raise ScanError(path, "empty file (0 bytes)")
    return head


def _open_image(path: Path) -> nib.spatialimages.SpatialImage:
    """nib.load with the usual failure modes turned into one-line ScanErrors."""
    if not path.exists():
        raise ScanError(path, "file not found")
    if path.is_dir():
        raise ScanError(path, "is a directory, not a NIfTI file")
    if is_temporary_name(path):
        raise ScanError(path, "is the temporary file of an unfinished write, not a scan")
    if not is_nifti_name(path):
        raise ScanError(path, "not a NIfTI file (expected a .nii or .nii.gz name)")
    head = _probe(path)
    if path.name.lower().endswith(".gz") and head != b"\x1f\x8b":
        raise ScanError(path, "not a NIfTI file (named .nii.gz but not gzip-compressed)")
    try:
        img = nib.load(path)
    except PermissionError as exc:
        raise ScanError(path, "permission denied (cannot read the file)") from exc
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
    except PermissionError:
        return "permission denied (cannot read the file)"
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


def _nan_background(data: np.ndarray, bad: np.ndarray) -> bool:
    """True when the non-finite voxels look like a NaN background, the convention of SPM and
    others for voxels outside the brain: NaN (no Inf), at least 90% of the array's border, and
    around one coherent finite region (90% of the finite voxels have a finite neighbour along
    the first axis), not scattered through the image."""
    if np.isinf(data).any():
        return False
    faces = [np.take(bad, i, axis=ax) for ax in range(bad.ndim) for i in (0, -1)]
    if sum(int(f.sum()) for f in faces) < 0.9 * sum(f.size for f in faces):
        return False
    finite = ~bad
    paired = int(np.count_nonzero(finite[1:] & finite[:-1]))
    return paired >= 0.9 * int(np.count_nonzero(finite))


def _check_nonfinite(data: np.ndarray, bad: np.ndarray, n_bad: int, path: Path | None) -> None:
    """Refuse a volume that is all, or (short of a NaN background) mostly, NaN/Inf."""
    if n_bad == data.size:
        raise ScanError(path, "has no finite voxel (all NaN or Inf)")
    fraction = n_bad / data.size
    if fraction > MAX_NONFINITE_FRACTION and not _nan_background(data, bad):
        raise ScanError(
            path,
            f"mostly non-finite: {n_bad} of {data.size} voxels ({fraction:.0%}) are NaN or Inf "
            "(a corrupt file, or not an image?)",
        )


def _check_values(data: np.ndarray, path: Path | None, *, constant_ok: bool = False) -> np.ndarray:
    """Replace NaN/Inf by the finite minimum (with a ScanWarning); refuse constant images.

    Refused: no finite voxel; more than :data:`MAX_NONFINITE_FRACTION` non-finite (unless they
    are a NaN background, see :func:`_nan_background`); a repair that leaves a constant image.
    """
    bad = ~np.isfinite(data)
    n_bad = int(np.count_nonzero(bad))
    if n_bad:
        _check_nonfinite(data, bad, n_bad, path)
        finite = data[~bad]
        fill, top = float(finite.min()), float(finite.max())
        if not constant_ok and top == fill:
            raise ScanError(
                path,
                f"nothing left after replacing its {n_bad} NaN/Inf voxel(s): "
                f"every finite voxel has the value {fill:g}",
            )
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


def _gzip_problem(exc: gzip.BadGzipFile) -> str:
    """One line for a gzip stream that decompressed but failed its checks."""
    text = str(exc)
    if "CRC check failed" in text:
        return "corrupt: gzip CRC check failed (the data do not match the file's checksum)"
    if "Incorrect length" in text:
        return "corrupt: gzip length check failed (the data do not match the length stored in the file)"
    if "Not a gzipped file" in text:
        return "corrupt: unexpected bytes after the end of the gzip data"
    return f"corrupt gzip data ({_one_line(exc)})"


def _read_gz_checked(klass: type, path: Path) -> np.ndarray:
    """Read a ``.nii.gz`` image's voxels (float32) through one gzip stream read to its end.

    nibabel stops decompressing at the last voxel, before the gzip trailer, so a wrong CRC-32 or
    length (garbage voxels in a valid deflate stream) would pass; Python's ``gzip`` checks both
    when a stream reaches its end. Reading header, voxels and the rest (in chunks, normally
    nothing) from the same stream decompresses the file once.
    """
    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:
        data = klass.from_stream(stream).get_fdata(dtype=np.float32, caching="unchanged")
        while stream.read(_CHUNK):
            pass
    return data


def _read_data(img: nib.spatialimages.SpatialImage, path: Path, shape3: tuple[int, ...]) -> np.ndarray:
    """The voxels of an opened image as float32 of shape ``shape3``; read errors are ScanErrors."""
    try:
        with np.errstate(over="ignore"):  # stored values beyond float32: see _check_float32_range
            if path.name.lower().endswith(".gz"):
                data = _read_gz_checked(type(img), path)
            else:
                data = img.get_fdata(dtype=np.float32, caching="unchanged")
        return np.asarray(data).reshape(shape3)
    except MemoryError as exc:
        raise ScanError(path, f"not enough memory to read {shape3} voxels") from exc
    except gzip.BadGzipFile as exc:
        raise ScanError(path, _gzip_problem(exc)) from exc
    except PermissionError as exc:
        raise ScanError(path, "permission denied (cannot read the file)") from exc
    except _READ_ERRORS as exc:
        raise ScanError(path, f"truncated or corrupt file ({_one_line(exc)})") from exc
    except Exception as exc:
        raise ScanError(path, f"cannot read voxel data ({_one_line(exc)})") from exc


def _check_float32_range(img: nib.spatialimages.SpatialImage, data: np.ndarray, path: Path) -> None:
    """Refuse stored values that only became Inf when read as float32 (float64 data, scaling)."""
    if np.dtype(img.header.get_data_dtype()) in (np.float32, np.float16) or np.isfinite(data).all():
        return
    try:
        wide = np.asarray(img.get_fdata(dtype=np.float64, caching="unchanged"))
    except Exception:  # the first read worked; keep its diagnosis
        return
    finite = np.isfinite(wide)
    if np.count_nonzero(~finite) < np.count_nonzero(~np.isfinite(data)):
        biggest = float(np.abs(wide[finite]).max())
        raise ScanError(
            path, f"values beyond the float32 range (largest magnitude {biggest:g}); rescale the scan"
        )


def _read(path: str | Path, *, constant_ok: bool) -> tuple[nib.Nifti1Image, np.ndarray, tuple[int, int, int]]:
    """Open, validate and read a NIfTI file; returns (image, float32 data as stored, 3D shape)."""
    path = Path(path)
    img = _open_image(path)
    shape3 = _spatial_shape(img, path)
    _check_dtype(img.header.get_data_dtype(), path)
    _check_affine(img.affine, path)
    data = _read_data(img, path, shape3)
    _check_float32_range(img, data, path)
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


def _dicom_header(data: np.ndarray, affine: np.ndarray, series: dicom.DicomSeries) -> nib.Nifti1Header:
    """A NIfTI-1 header for a DICOM series' stored grid (scanner-frame qform and sform, mm)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header.set_xyzt_units("mm", "sec")
    header.set_sform(affine, code="scanner")
    header.set_qform(affine, code="scanner")
    header["descrip"] = (series.description or "DICOM series").encode("ascii", "replace")[:79]
    return header


def _load_dicom(path: str | Path) -> Volume:
    """A DICOM series (see :func:`dicom.read_series`) validated like a NIfTI scan."""
    series = dicom.read_series(path)
    folder = series.folder
    shape3 = tuple(int(s) for s in series.data.shape)
    if max(shape3) > MAX_DIM or int(np.prod(shape3, dtype=np.int64)) > MAX_VOXELS:
        raise ScanError(
            folder, f"absurd size {shape3} (limits: {MAX_DIM} per axis, {MAX_VOXELS} voxels in all)"
        )
    _check_affine(series.affine, folder)
    data = _check_values(series.data, folder, constant_ok=False)
    canon, canon_affine = to_canonical(data, series.affine)
    _check_slice_plane(canon.shape, folder)
    header = _dicom_header(data, series.affine, series)
    source_affine = np.array(series.affine, dtype=float)
    return Volume(canon, canon_affine, header, source_affine, shape3, folder, series.name)


def load_scan(path: str | Path) -> Volume:
    """Load and validate a 3D NIfTI scan (or a DICOM series folder) into canonical RAS+ float32.

    Raises ScanError naming the file and the problem (missing, unreadable, empty, not NIfTI,
    truncated, a ``.nii.gz`` failing its gzip CRC or length check, absurd header, values beyond
    float32, all or mostly NaN/Inf, constant). A few NaN/Inf voxels (or a NaN background) are
    replaced by the finite minimum with a ScanWarning. A folder (not named ``.nii``) or
    ``folder::SERIES`` is read as a DICOM series (:func:`is_dicom_source`); its Volume's ``path``
    is the folder, its name the folder's.
    """
    if is_dicom_source(path):
        return _load_dicom(path)
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
    """A float map (e.g. ``*_anomaly.nii.gz``) in canonical orientation, checked against ``like``.

    Read like a scan (one-line ScanErrors for unreadable, corrupt or absurd files); a map must be
    finite (no repair).
    """
    path = Path(path)
    img = _open_image(path)
    if len(img.shape) < 3:
        raise ScanError(path, f"anomaly map must be 3D, got shape {tuple(img.shape)}")
    shape3 = _spatial_shape(img, path)
    _check_dtype(img.header.get_data_dtype(), path)
    data = _read_data(img, path, shape3)
    data, _ = to_canonical(data, img.affine)
    if data.shape != like.data.shape:
        raise ScanError(path, f"anomaly map shape {data.shape} does not match the scan's {like.data.shape}")
    if not np.all(np.isfinite(data)):
        raise ScanError(path, "anomaly map contains NaN or Inf")
    return data
