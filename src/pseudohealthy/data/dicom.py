"""DICOM in: one series of a folder read with SimpleITK's series reader into a RAS+ voxel grid.

Owns what counts as a DICOM source (a folder holding one series, or ``folder::SERIES`` choosing
one of several: :data:`SERIES_SEPARATOR`), the name such a source gets (:func:`series_name`) and
the reading itself (:func:`read_series`): GDCM's series IDs and its slice sorting by position,
the oblique direction cosines kept, ITK's LPS physical frame turned into the NIfTI RAS+ affine
(``diag(-1, -1, 1, 1) @ [direction * spacing | origin]``). Validation of the voxels and the
:class:`~pseudohealthy.data.io.Volume` are :mod:`pseudohealthy.data.io`'s (``load_scan`` reads a
DICOM folder through here). SimpleITK is optional (the ``preprocess`` extra); without it a
one-line :class:`~pseudohealthy.errors.ScanError` says what to install.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pseudohealthy.errors import ScanError

__all__ = [
    "INSTALL_HINT",
    "SERIES_SEPARATOR",
    "DicomSeries",
    "SeriesInfo",
    "has_dicom_files",
    "list_series",
    "read_series",
    "series_name",
    "split_series",
]

SERIES_SEPARATOR = "::"
"""``folder::SERIES`` names one series of a folder holding several (its UID, its number in the
list an error gives, or its unique SeriesDescription)."""
INSTALL_HINT = "pip install 'pseudohealthy[preprocess]'"
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_NOT_DICOM = (".nii", ".nii.gz", ".json", ".txt", ".csv", ".md", ".tsv")  # never probed
_PROBE_FILES = 16  # files looked at by has_dicom_files
_SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap from the mean before it is refused
_META_KEYS = (("0008|0060", "modality"), ("0008|103e", "series_description"), ("0020|0011", "series_number"))
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class SeriesInfo:
    """One series of a folder: its UID, its files (sorted by slice position) and description."""

    uid: str
    files: tuple[str, ...]
    description: str = ""


@dataclass
class DicomSeries:
    """A read series: voxels in the stored (ITK index) order and their RAS+ affine."""

    data: np.ndarray  # float32, (i, j, k) = ITK index order (columns, rows, slices)
    affine: np.ndarray  # 4x4 RAS+, voxel index -> mm
    folder: Path
    uid: str
    description: str = ""
    name: str = ""
    meta: dict[str, str] = field(default_factory=dict)


def split_series(path: str | Path) -> tuple[Path, str | None]:
    """``folder::SERIES`` -> ``(folder, "SERIES")``; any other path -> ``(path, None)``."""
    text = str(path)
    if SERIES_SEPARATOR in Path(text).name:
        folder, _, selector = text.rpartition(SERIES_SEPARATOR)
        return Path(folder), selector.strip() or None
    return Path(text), None


def series_name(path: str | Path) -> str:
    """The scan name of a DICOM source: the folder's name (``folder_SERIES`` when one is chosen)."""
    folder, selector = split_series(path)
    if selector is None:
        return folder.name
    return f"{folder.name}_{_UNSAFE.sub('_', selector).strip('_') or 'series'}"


def _is_dicom_file(path: Path) -> bool:
    """A DICOM suffix, or the ``DICM`` magic after the 128-byte preamble."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def has_dicom_files(folder: str | Path) -> bool:
    """True when ``folder`` (not its subfolders) holds DICOM files; cheap, needs no SimpleITK.

    Looks at the names of every file and the first bytes of at most a few: enough to tell a
    series folder from a folder of NIfTI scans when scans are being collected.
    """
    folder = Path(folder)
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return False
    if any(p.name.lower().endswith(DICOM_SUFFIXES) for p in files):
        return True
    others = [p for p in files if not p.name.lower().endswith(_NOT_DICOM)]
    return any(_is_dicom_file(p) for p in others[:_PROBE_FILES])


def _backend(path: Path):
    """The SimpleITK module, or a one-line ScanError that says how to install it."""
    try:
        import SimpleITK as sitk
    except ImportError:
        problem = f"reading DICOM needs SimpleITK, which is not installed: {INSTALL_HINT}"
        raise ScanError(path, problem) from None
    return sitk


def _itk_message(exc: BaseException) -> str:
    """One line of an ITK exception (its 'Description:' when there is one)."""
    text = str(exc)
    for line in text.splitlines():
        if "Description:" in line:
            return " ".join(line.split("Description:", 1)[1].split())
    return " ".join(text.split())[:300]


def _description(sitk, first_file: str) -> str:
    """The SeriesDescription (0008|103e) of a series' first file, or ''."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(first_file)
    try:
        reader.ReadImageInformation()
        return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""
    except RuntimeError:
        return ""


def _check_folder(folder: Path) -> list[Path]:
    """The folder's files; a missing, unreadable or empty folder is a one-line ScanError."""
    if not folder.exists():
        raise ScanError(folder, "folder not found")
    if not folder.is_dir():
        raise ScanError(folder, "not a folder (a DICOM series is given as the folder holding its files)")
    try:
        files = [p for p in folder.iterdir() if p.is_file()]
    except PermissionError as exc:
        raise ScanError(folder, "permission denied (cannot list the folder)") from exc
    except OSError as exc:
        raise ScanError(folder, f"cannot list the folder ({exc.strerror or exc})") from exc
    if not files:
        raise ScanError(
            folder, "empty folder: no DICOM series (give a folder holding one DICOM series, or a NIfTI file)"
        )
    return files


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series in ``folder`` (not its subfolders), in GDCM's order; each series' files
    sorted by slice position. A folder without any is a ScanError."""
    folder = Path(folder)
    files = _check_folder(folder)
    sitk = _backend(folder)
    try:
        uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise ScanError(folder, f"cannot scan the folder for DICOM series ({_itk_message(exc)})") from exc
    if not uids:
        dicom_named = sum(p.name.lower().endswith(DICOM_SUFFIXES) for p in files)
        why = (
            f"{dicom_named} file(s) are named like DICOM but none is readable"
            if dicom_named
            else (f"none of its {len(files)} file(s) is DICOM")
        )
        raise ScanError(folder, f"no DICOM series in the folder ({why})")
    out = []
    for uid in uids:
        names = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        out.append(SeriesInfo(uid, names, _description(sitk, names[0]) if names else ""))
    _check_left_out(folder, files, out)
    return out


def _check_left_out(folder: Path, files: list[Path], series: list[SeriesInfo]) -> None:
    """Refuse DICOM files (by name or magic) that no series took: GDCM skips files it cannot
    parse, which would silently drop a truncated or corrupt slice."""
    taken = {Path(name).resolve() for info in series for name in info.files}
    left = sorted(p.name for p in files if p.resolve() not in taken and _is_dicom_file(p))
    if left:
        raise ScanError(
            folder,
            f"{len(left)} DICOM file(s) cannot be read (truncated or corrupt), e.g. {left[0]}; "
            "remove or replace them",
        )


def _choose(folder: Path, series: list[SeriesInfo], selector: str | None) -> SeriesInfo:
    """The series ``selector`` names (UID, 1-based number or unique description); the only one
    when there is no selector; else a one-line ScanError listing them and how to choose."""
    if selector is None and len(series) == 1:
        return series[0]
    if selector is not None:
        by_uid = [s for s in series if s.uid == selector]
        by_desc = [s for s in series if s.description and s.description == selector]
        if by_uid or len(by_desc) == 1:
            return (by_uid or by_desc)[0]
        if selector.isdigit() and 1 <= int(selector) <= len(series):
            return series[int(selector) - 1]
    listing = "; ".join(
        f"{i}: {s.uid} ({s.description or 'no description'}, {len(s.files)} files)"
        for i, s in enumerate(series, start=1)
    )
    if selector is None:
        head = f"holds {len(series)} DICOM series"
    else:
        head = f"no series {selector!r} among its {len(series)} DICOM series"
    raise ScanError(
        folder,
        f"{head}: {listing}; choose one as {folder}{SERIES_SEPARATOR}SERIES_UID (or its number), "
        "or move each series into its own folder",
    )


def _slice_positions(reader, n_slices: int, normal: np.ndarray) -> np.ndarray | None:
    """Each slice's position along the slice normal (mm), from ImagePositionPatient, or None."""
    positions = []
    for k in range(n_slices):
        if not reader.HasMetaDataKey(k, "0020|0032"):
            return None
        try:
            xyz = [float(v) for v in reader.GetMetaData(k, "0020|0032").split("\\")]
        except ValueError:
            return None
        if len(xyz) != 3:
            return None
        positions.append(float(np.dot(xyz, normal)))
    return np.asarray(positions)


def _check_slices(reader, image, folder: Path, n_files: int) -> None:
    """Refuse repeated or unevenly spaced slices (several volumes in one series, missing files)."""
    n_slices = int(image.GetSize()[2])
    if n_files < 2 or n_slices != n_files:
        return  # one (multi-frame) file, or a reader that stacked differently: nothing to compare
    normal = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    positions = _slice_positions(reader, n_slices, normal)
    if positions is None:
        return
    gaps = np.abs(np.diff(positions))
    if gaps.min() < 1e-3:
        raise ScanError(
            folder,
            "repeated slice positions: the series holds several volumes (time points, echoes or "
            "b-values), not one 3D scan",
        )
    mean = float(gaps.mean())
    worst = int(np.argmax(np.abs(gaps - mean)))
    if abs(gaps[worst] - mean) > _SPACING_TOLERANCE * mean:
        raise ScanError(
            folder,
            f"unevenly spaced slices (gap of {gaps[worst]:.3g} mm after slice {worst + 1}, "
            f"{mean:.3g} mm on average): a file is missing or the series is not one 3D stack",
        )


def _execute(sitk, info: SeriesInfo, folder: Path):
    """Read a series' files into one image (private tags and per-slice metadata kept)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(info.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ScanError(folder, f"cannot read the DICOM series {info.uid} ({_itk_message(exc)})") from exc
    except MemoryError as exc:
        raise ScanError(folder, f"not enough memory to read the DICOM series {info.uid}") from exc
    return reader, image


def ras_affine(image) -> np.ndarray:
    """The 4x4 RAS+ affine (voxel index -> mm) of a SimpleITK image (LPS physical frame)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing[None, :]
    lps[:3, 3] = np.asarray(image.GetOrigin(), dtype=float)
    return _LPS_TO_RAS @ lps


def _voxels(sitk, image, folder: Path) -> np.ndarray:
    """The image's voxels as float32 in ITK index order (i, j, k)."""
    if image.GetDimension() != 3:
        raise ScanError(folder, f"the DICOM series is {image.GetDimension()}D; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ScanError(
            folder,
            f"unsupported pixels ({image.GetPixelIDTypeAsString()}): need one real value per voxel, not RGB",
        )
    try:
        array = sitk.GetArrayViewFromImage(image)  # (k, j, i)
        return np.ascontiguousarray(array.transpose(2, 1, 0), dtype=np.float32)
    except MemoryError as exc:
        raise ScanError(folder, f"not enough memory for {tuple(image.GetSize())} voxels") from exc


def read_series(path: str | Path) -> DicomSeries:
    """Read the DICOM series of a folder (``folder::SERIES`` to choose one of several).

    Slices are sorted by position (GDCM), the oblique direction cosines and the spacing kept; the
    affine is RAS+. One-line ScanErrors: missing or empty folder, no series, several series
    (listed, with how to choose), unreadable files, repeated or unevenly spaced slices, not
    scalar 3D, SimpleITK missing.
    """
    folder, selector = split_series(path)
    series = list_series(folder)
    info = _choose(folder, series, selector)
    sitk = _backend(folder)
    reader, image = _execute(sitk, info, folder)
    _check_slices(reader, image, folder, len(info.files))
    data = _voxels(sitk, image, folder)
    meta = {}
    for key, label in _META_KEYS:
        if reader.HasMetaDataKey(0, key):
            meta[label] = reader.GetMetaData(0, key).strip()
    return DicomSeries(
        data=data,
        affine=ras_affine(image),
        folder=folder,
        uid=info.uid,
        description=info.description,
        name=series_name(path),
        meta={"series_uid": info.uid, "files": str(len(info.files)), **meta},
    )
