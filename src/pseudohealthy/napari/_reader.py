"""napari reader for NIfTI (.nii, .nii.gz): canonical RAS+ voxels + their full affine.

Every file opens reoriented to closest-canonical RAS+ (the library's convention, the same as
:func:`pseudohealthy.data.io.load_scan`), with the canonical 4x4 affine as the layer ``affine``: so
napari's world coordinates are the file's RAS+ millimetres, only a residual rotation (oblique
scans) is left to the affine, and permuted files (e.g. PSR) display without napari having to
slice through a permutation. Images are validated by ``load_scan``; label-like files (integer
values, few of them, or a name with mask/seg/label) open as Labels. A scan opens in grey from its
0.5th to 99.5th percentile; an anomaly map (``<name>_anomaly.nii.gz``, or one member's
``<name>_anomaly_<member>.nii.gz``) and the members' disagreement (``<name>_uncertainty.nii.gz``)
as the viewer shows the maps it restored: the same colormap, blending and display range. Layer
metadata holds the NIfTI header as plain values, the source path, the source (stored) affine and
the layer affine.

A folder holding one DICOM series opens the same way (read by ``load_scan``: SimpleITK's series
reader, slices sorted by position, the oblique direction kept), with its series UID and
description in the metadata (``dicom``); the header is the NIfTI header built for the series'
grid, so that the writer saves layers as NIfTI in the series' geometry.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pseudohealthy.data.io import is_dicom_folder, is_nifti_name, load_scan, scan_name, to_canonical
from pseudohealthy.engine.outputs import map_kind
from pseudohealthy.napari._display import anomaly_style, saved_map_range, uncertainty_style
from pseudohealthy.napari._layers import NIFTI_KEY, RAS_LABELS

LABEL_NAME = re.compile(r"(mask|seg|label|lesion|roi|annot)", re.IGNORECASE)
MAX_LABELS_UNNAMED = 16  # integer files with at most this many values open as Labels
MAX_LABELS_NAMED = 1024  # ... or this many when the name says mask/seg/label

LayerData = tuple[np.ndarray, dict[str, Any], str]


def napari_get_reader(path: str | Sequence[str]) -> Callable[[str | Sequence[str]], list[LayerData]] | None:
    """Return :func:`read_nifti` when every path is a NIfTI file name or a folder holding a DICOM
    series, else None."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths or not all(is_nifti_name(p) or is_dicom_folder(p) for p in paths):
        return None
    return read_nifti


def read_nifti(path: str | Sequence[str]) -> list[LayerData]:
    """Read one or more NIfTI files (or DICOM series folders) into napari layer data tuples."""
    paths = [path] if isinstance(path, str | Path) else list(path)
    return [read_one(p) for p in paths]


def header_dict(header: nib.Nifti1Header) -> dict[str, Any]:
    """The NIfTI header as a dict of plain Python values (numbers, lists, strings)."""
    out: dict[str, Any] = {}
    for key in header:
        value = np.asarray(header[key])
        if value.dtype.kind == "S":
            out[key] = value.tobytes().rstrip(b"\x00").decode("latin-1")
        else:
            plain = value.tolist()
            out[key] = None if isinstance(plain, float) and not np.isfinite(plain) else plain
    return out


def read_one(path: str | Path) -> LayerData:
    """One NIfTI file -> (canonical data, layer kwargs, "image" | "labels"); a DICOM series
    folder -> an image layer."""
    path = Path(path)
    labels = None if is_dicom_folder(path) else _read_labels(path)
    if labels is not None:
        raw, img = labels
        source_affine = np.array(img.affine, dtype=float)
        data, affine = to_canonical(raw, source_affine)
        header = img.header
        kind = "labels"
        name = scan_name(path)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            volume = load_scan(path)
        for warning in caught:  # repairs (NaN voxels) become napari notifications
            warnings.warn(str(warning.message), warning.category, stacklevel=2)
        data, affine, source_affine = volume.data, volume.affine, volume.source_affine
        header = volume.header
        kind = "image"
        name = volume.name
    meta = {
        NIFTI_KEY: affine.tolist(),
        "source_path": str(path.resolve()),
        "source_affine": source_affine.tolist(),
        "nifti_header": header_dict(header),
    }
    if is_dicom_folder(path):
        meta["dicom"] = _dicom_meta(header, path)
    kwargs: dict[str, Any] = {
        "name": name,
        "affine": affine,
        "metadata": meta,
        "units": ("mm",) * 3,
        "axis_labels": RAS_LABELS,
    }
    if kind == "image":
        kwargs.update(image_display(path, data))
    return data, kwargs, kind


def is_anomaly_map(path: str | Path) -> bool:
    """Whether ``path`` names an anomaly map, the ensemble's or one member's, as ``pseudohealthy
    restore`` and ``evaluate`` write them (:func:`~pseudohealthy.engine.outputs.map_kind`)."""
    return map_kind(path) in ("anomaly", "member")


def image_display(path: str | Path, data: np.ndarray) -> dict[str, Any]:
    """Colormap and contrast of an image layer: an anomaly map (:func:`is_anomaly_map`) as the
    viewer shows a map it restored (:func:`~pseudohealthy.napari._display.anomaly_style`, limits
    from the map's display range), a scan in grey from its 0.5th to 99.5th percentile."""
    kind = map_kind(path)
    if kind is not None:
        style = uncertainty_style() if kind == "uncertainty" else anomaly_style()
        return {**style, "contrast_limits": saved_map_range(data)}
    lo, hi = np.percentile(data, [0.5, 99.5]) if data.size else (0.0, 1.0)
    return {"colormap": "gray", "contrast_limits": (float(lo), float(max(hi, lo + 1e-6)))}


def _dicom_meta(header: nib.Nifti1Header, path: Path) -> dict[str, Any]:
    """What the layer records of a DICOM source: the folder and the series description."""
    descrip = np.asarray(header["descrip"]).tobytes().rstrip(b"\x00").decode("latin-1")
    return {"folder": str(path.resolve()), "series_description": descrip}


def _read_labels(path: Path) -> tuple[np.ndarray, nib.Nifti1Image] | None:
    """Integer-valued data for label-like files, else None (errors surface via load_scan)."""
    try:
        img = nib.load(path)
        dtype = img.header.get_data_dtype()
        named = bool(LABEL_NAME.search(scan_name(path)))
        if dtype.kind not in "iub" and not (named and dtype.kind == "f"):
            return None
        if len(img.shape) < 3 or any(s != 1 for s in img.shape[3:]):
            return None
        raw = np.asanyarray(img.dataobj).reshape(img.shape[:3])
    except Exception:  # unreadable: let load_scan explain why
        return None
    if not np.all(np.isfinite(raw)) or not np.all(np.isfinite(img.affine)):
        return None
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.round(raw)):
        return None
    values = np.unique(raw)
    if len(values) > (MAX_LABELS_NAMED if named else MAX_LABELS_UNNAMED) or values.min() < 0:
        return None
    top = int(values.max())
    dtype_out = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
    return raw.astype(dtype_out), img
