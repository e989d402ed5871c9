"""`pseudohealthy synth` on a small crop of a real scan: NIfTIs in the scan's geometry, PNG."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pseudohealthy.cli import main
from pseudohealthy.data.anomalies import TASKS

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "brats2013_pat0006_flair.nii.gz"


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory, shared_data) -> Path:
    """Axial slices 60-79 of MSLUB patient 19's FLAIR (LAS, negative values in the brain)."""
    img = nib.load(shared_data / "lesion/mslub/patient19/FLAIR.nii.gz")
    crop = img.slicer[20:160, 20:200, 60:80]
    path = tmp_path_factory.mktemp("scan") / "flair_crop.nii.gz"
    nib.save(crop, path)
    return path


def _run(*argv: str) -> int:
    return main(["-q", "synth", *map(str, argv)])


def test_synth_writes_all_tasks_in_scan_geometry(small_scan, tmp_path):
    out = tmp_path / "out" / "nested"
    assert _run(small_scan, "--task", "all", "--seed", "4", "-o", out, "--size", "64", "--slices", "6") == 0
    src = nib.load(small_scan)
    original = src.get_fdata()
    for task in TASKS:
        img = nib.load(out / f"flair_crop_{task}_corrupted.nii.gz")
        mask = nib.load(out / f"flair_crop_{task}_mask.nii.gz")
        for written in (img, mask):
            assert written.shape == src.shape
            np.testing.assert_allclose(written.affine, src.affine)
        m = np.asarray(mask.dataobj)
        assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        data = img.get_fdata()
        assert m.any()
        np.testing.assert_array_equal(data[m == 0], original[m == 0])
        assert not np.allclose(data[m == 1], original[m == 1])
        assert data.min() >= original.min() - 1e-5 and data.max() <= original.max() + 1e-5
        # at most 6 axial slices carry anomalies (the file is LAS: axial is the last axis)
        assert 1 <= np.count_nonzero(m.any(axis=(0, 1))) <= 6
    png = out / "flair_crop_gallery.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_synth_is_reproducible_and_refuses_to_overwrite(small_scan, tmp_path, capsys):
    args = ("--task", "sink,intensity", "--seed", "9", "--size", "48", "--slices", "3")
    assert _run(small_scan, *args, "-o", tmp_path / "a") == 0
    assert _run(small_scan, *args, "-o", tmp_path / "b") == 0
    for name in ("flair_crop_sink_corrupted.nii.gz", "flair_crop_intensity_mask.nii.gz"):
        a = nib.load(tmp_path / "a" / name).get_fdata()
        b = nib.load(tmp_path / "b" / name).get_fdata()
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "a" / "flair_crop_source_mask.nii.gz").exists()
    capsys.readouterr()
    assert _run(small_scan, *args, "-o", tmp_path / "a") == 2
    assert "already exists" in capsys.readouterr().err
    assert _run(small_scan, *args, "-o", tmp_path / "a", "--overwrite") == 0


def test_synth_refuses_to_write_onto_inputs_and_bad_tasks(small_scan, tmp_path, capsys):
    # a brain mask whose name is one of the outputs: refused before anything is written
    mask_path = tmp_path / "flair_crop_sink_mask.nii.gz"
    src = nib.load(small_scan)
    nib.save(nib.Nifti1Image(np.ones(src.shape, np.uint8), src.affine), mask_path)
    before = mask_path.read_bytes()
    assert _run(small_scan, "--task", "sink", "-o", tmp_path, "--brain-mask", mask_path, "--overwrite") == 2
    assert "input" in capsys.readouterr().err
    assert mask_path.read_bytes() == before
    assert _run(small_scan, "--task", "blur", "-o", tmp_path / "x") == 2
    assert "unknown task" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synth_on_bundled_sample_with_inter_dir(tmp_path):
    from skimage.io import imsave

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    imsave(photos / "p.png", (rng.random((64, 64)) * 255).astype(np.uint8))
    out = tmp_path / "o"
    assert (
        _run(
            SAMPLE,
            "--task",
            "poisson_inter",
            "-o",
            out,
            "--size",
            "48",
            "--slices",
            "2",
            "--inter-dir",
            photos,
        )
        == 0
    )
    img = nib.load(out / "brats2013_pat0006_flair_poisson_inter_corrupted.nii.gz")
    assert img.shape == nib.load(SAMPLE).shape
    np.testing.assert_allclose(img.affine, nib.load(SAMPLE).affine)
