"""Images of another modality for the inter-dataset Poisson task."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from pseudohealthy.data.files import is_temporary_name
from pseudohealthy.data.io import is_nifti_name, to_canonical
from pseudohealthy.errors import ScanError

__all__ = ["DEFAULT_PHOTOS", "load_inter_sources", "to_grey_square"]

# photographs bundled with scikit-image (no download): a fundus photograph (as the authors
# used for MRI), natural scenes, textures, microscopy and astronomy
DEFAULT_PHOTOS = (
    "retina",
    "microaneurysms",
    "camera",
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "cell",
    "clock",
)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")


def to_grey_square(image: np.ndarray, size: int) -> np.ndarray:
    """Grey ``float32`` in [0, 1] (min-max), centre-cropped to a square, resized to ``size``."""
    from skimage.color import rgb2gray
    from skimage.transform import resize

    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = rgb2gray(img[..., :3])
    if img.ndim != 2:
        raise ValueError(f"expected a 2D grey or RGB(A) image, got shape {img.shape}")
    img = img.astype(np.float64)
    h, w = img.shape
    side = min(h, w)
    img = img[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    img = resize(img, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    lo, hi = float(img.min()), float(img.max())
    out = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    out = out.astype(np.float32)
    out.flags.writeable = False
    return out


def _nifti_slice(path: Path) -> np.ndarray:
    """The middle axial slice of a NIfTI file (first volume of a 4D one), canonical orientation."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    while data.ndim > 3:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[:, :, None]
    data, _ = to_canonical(data, img.affine)
    return np.nan_to_num(data[:, :, data.shape[2] // 2])


def _is_source_name(path: Path) -> bool:
    """An image or NIfTI file name, not a temporary name of an unfinished write."""
    if is_nifti_name(path):
        return True
    return path.name.lower().endswith(_IMAGE_SUFFIXES) and not is_temporary_name(path)


def _read(path: Path) -> np.ndarray:
    if is_nifti_name(path):
        return _nifti_slice(path)
    from skimage.io import imread

    return imread(path)


@functools.lru_cache(maxsize=8)
def _load(folder: str | None, size: int) -> tuple[np.ndarray, ...]:
    if folder is None:
        import skimage.data

        return tuple(to_grey_square(getattr(skimage.data, name)(), size) for name in DEFAULT_PHOTOS)
    root = Path(folder)
    if not root.is_dir():
        raise ScanError(root, "not a folder of source images")
    files = sorted(p for p in root.iterdir() if p.is_file() and _is_source_name(p))
    if not files:
        raise ScanError(root, "contains no images (PNG, JPEG, TIFF, BMP, GIF or NIfTI)")
    out = []
    for path in files:
        try:
            out.append(to_grey_square(_read(path), size))
        except Exception as exc:  # unreadable or unusable file: name it
            raise ScanError(path, f"cannot use as a source image: {exc}") from exc
    return tuple(out)


def load_inter_sources(folder: str | Path | None = None, size: int = 128) -> list[np.ndarray]:
    """Grey [0, 1] ``size`` x ``size`` images of another modality (read-only arrays).

    ``folder``: any folder of PNG/JPEG/TIFF/BMP/GIF images or NIfTI scans (middle axial
    slice); default: photographs bundled with scikit-image (:data:`DEFAULT_PHOTOS`).
    Results are cached.
    """
    if int(size) < 4:
        raise ValueError(f"size must be at least 4, got {size}")
    key = None if folder is None else str(Path(folder).resolve())
    return list(_load(key, int(size)))
