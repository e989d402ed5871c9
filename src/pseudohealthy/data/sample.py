"""Locate the bundled sample data: a real BraTS FLAIR scan, its lesion mask and the demo ensemble."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SAMPLE_SCAN = "brats2013_pat0006_flair.nii.gz"
SAMPLE_MASK = "brats2013_pat0006_lesion.nii.gz"
DEMO_ENSEMBLE = "demo_ensemble"


def sample_data_dir() -> Path:
    """The ``sample_data`` folder: inside the installed package, else the checkout's top level."""
    candidates = [
        Path(str(files("pseudohealthy") / "sample_data")),
        Path(__file__).resolve().parents[3] / "sample_data",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no sample_data folder found (looked in {', '.join(map(str, candidates))})")


def sample_scan_path() -> Path:
    """Path of the bundled FLAIR scan (BraTS 2013 patient 0006, cropped, LPS, 1 mm)."""
    return _existing(sample_data_dir() / SAMPLE_SCAN)


def sample_mask_path() -> Path:
    """Path of the bundled scan's tumour mask (uint8 0/1, same grid)."""
    return _existing(sample_data_dir() / SAMPLE_MASK)


def demo_ensemble_path() -> Path | None:
    """Path of the bundled demo ensemble folder, or None when it is not installed."""
    try:
        path = sample_data_dir() / DEMO_ENSEMBLE
    except FileNotFoundError:
        return None
    return path if path.is_dir() else None


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"bundled sample file missing: {path}")
    return path
