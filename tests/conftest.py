"""Shared fixtures: the real scans in ../shared/data and small synthetic NIfTI files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Qt's QApplication calls setlocale(LC_ALL, ""): with no locale in the environment (CI, Xvfb) the
# process then decodes text as ASCII. Give it a UTF-8 locale before any Qt test starts.
if not any(os.environ.get(v) for v in ("LC_ALL", "LC_CTYPE", "LANG")):
    os.environ["LC_CTYPE"] = "C.UTF-8"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of the project's shared real scans (``../shared/data``).

    CI and the project's machines have it beside the checkout; a clone elsewhere skips the tests
    on real scans (and says so in pytest's summary) rather than failing for want of data. CI sets
    ``PSEUDOHEALTHY_REQUIRE_SHARED_DATA=1`` (``.ci/run``): there a missing folder fails every
    test on real scans, so none of them can pass by being skipped.
    """
    if not SHARED_DATA.is_dir():
        message = f"shared data folder {SHARED_DATA} is absent"
        if os.environ.get("PSEUDOHEALTHY_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(message + " (required: PSEUDOHEALTHY_REQUIRE_SHARED_DATA=1)")
        pytest.skip(message)
    return SHARED_DATA


def phantom(shape: tuple[int, ...] = (32, 32, 12), background: float = 0.0, seed: int = 0) -> np.ndarray:
    """A smooth ellipsoidal "brain" with two tissue levels on a constant background, float32."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = sum((g / 0.8) ** 2 for g in grids)
    inner = sum((g / 0.4) ** 2 for g in grids)
    img = np.where(r2 < 1, 0.5 + 0.3 * np.exp(-inner) + 0.02 * rng.standard_normal(shape), 0.0)
    img = np.where(r2 < 1, img, background)
    return img.astype(np.float32)


def write_nifti(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``data`` (stored as ``dtype``, no scaling) with ``affine`` (default 1 mm identity)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(data) if dtype is None else np.asarray(data).astype(dtype)
    img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine)
    img.header.set_data_dtype(arr.dtype)
    nib.save(img, path)
    return path


@pytest.fixture
def make_nifti(tmp_path: Path) -> Callable[..., Path]:
    """Factory ``make_nifti(data=None, name="scan.nii.gz", affine=None, dtype=None) -> Path``.

    With ``data=None`` writes a 32x32x12 phantom; files go into the test's ``tmp_path``.
    """

    def make(
        data: np.ndarray | None = None,
        name: str = "scan.nii.gz",
        affine: np.ndarray | None = None,
        dtype: np.dtype | type | None = None,
    ) -> Path:
        return write_nifti(tmp_path / name, phantom() if data is None else data, affine, dtype)

    return make
