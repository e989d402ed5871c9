"""napari writers: image and labels layers back to NIfTI in the source scan's geometry.

When the layer remembers its source file (``metadata["source_path"]``) and still sits on its
grid (in any orientation), the file is written with :func:`pseudohealthy.data.io.save_like`: voxels
in the source's stored order, its affine and header. Otherwise the layer's data are written as
they are, with the layer's data->world transform (as RAS) for the affine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from pseudohealthy.data.files import atomic_write
from pseudohealthy.data.io import Volume, is_nifti_name, load_scan, save_like, to_canonical
from pseudohealthy.errors import ScanError
from pseudohealthy.napari._layers import NIFTI_KEY, as_3d, ras_from_world


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for image layers (float32 NIfTI)."""
    return write_nifti(path, data, meta, labels=False)


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for labels layers (smallest unsigned integer NIfTI)."""
    return write_nifti(path, data, meta, labels=True)


def state_affine(meta: dict[str, Any], ndim: int) -> np.ndarray:
    """The full data->world matrix from a layer state (affine x (rotate shear scale + translate))."""
    from napari.utils.transforms import Affine

    inner = Affine(
        scale=meta.get("scale", (1.0,) * ndim),
        translate=meta.get("translate", (0.0,) * ndim),
        rotate=meta.get("rotate"),
        shear=meta.get("shear"),
        ndim=ndim,
    )
    extra = meta.get("affine")
    extra = (
        np.eye(ndim + 1) if extra is None else np.asarray(getattr(extra, "affine_matrix", extra), dtype=float)
    )
    return extra @ inner.affine_matrix


def write_nifti(path: str | Path, data: Any, meta: dict[str, Any], *, labels: bool) -> list[str]:
    """Write one layer's data to ``path`` (.nii or .nii.gz); returns the written paths."""
    path = Path(path)
    if not is_nifti_name(path):
        return []
    arr = np.asarray(data)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():  # e.g. unrestored (NaN) slices
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    if arr.ndim not in (2, 3):
        raise ScanError(path, f"can only write 2D or 3D layers as NIfTI, got shape {arr.shape}")
    metadata = meta.get("metadata") or {}
    affine = ras_from_world(state_affine(meta, arr.ndim), nifti=NIFTI_KEY in metadata)
    arr3 = as_3d(arr)
    dtype = _label_dtype(arr3) if labels else np.dtype(np.float32)
    canonical, canonical_affine = to_canonical(arr3, affine)
    like = _source_like(metadata.get("source_path"), canonical.shape, canonical_affine)
    if like is not None:
        save_like(canonical, like, path, dtype=dtype, overwrite=True)
        return [str(path)]
    out = np.asarray(arr3, dtype=dtype)
    img = nib.Nifti1Image(out, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(img, tmp))
    return [str(path)]


def _label_dtype(arr: np.ndarray) -> np.dtype:
    top = int(arr.max()) if arr.size else 0
    if arr.size and int(arr.min()) < 0:
        return np.dtype(np.int32)
    return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)


def _source_like(source: str | None, shape: tuple[int, ...], affine: np.ndarray) -> Volume | None:
    """The source scan as a Volume when the layer (canonical ``shape``, ``affine``) is on its grid."""
    if not source or not Path(source).is_file():
        return None
    try:
        like = load_scan(source)
    except ScanError:
        return None
    if tuple(like.shape) != tuple(shape) or not np.allclose(like.affine, affine, atol=1e-4):
        return None
    return like
