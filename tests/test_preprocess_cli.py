"""`pseudohealthy preprocess` and `pseudohealthy.data.registration`: known-affine recovery on a real scan,
output geometry, atlas skull stripping vs the MSLUB brain, refusals, and the MSLUB protocol (tiny)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK  # noqa: F401  (the preprocess extra that setup.sh installs; fail loudly if missing)

from conftest import phantom
from pseudohealthy.cli import main
from pseudohealthy.data import registration as reg
from pseudohealthy.data.io import load_scan
from pseudohealthy.errors import ScanWarning

IXI = ("IXI132-HH-1415_T1.nii.gz", "IXI162-HH-1548_T1.nii.gz")  # the first two, as the protocol takes
MNI_SHAPE = (91, 109, 91)
RECOVERY_TOL_MM = 1.0  # mean error over the template's brain voxels, 2 mm scans
DICE_MIN = 0.9


def _cli(*args) -> int:
    return main(["-q", "preprocess", *map(str, args)])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def template() -> reg.Template:
    return reg.load_template()


@pytest.fixture(scope="module")
def mslub_2mm(tmp_path_factory, shared_data: Path) -> dict[str, Path]:
    """MSLUB patient 07 T1 and lesion mask at 2 mm (every other voxel; still LAS, in MNI space)."""
    out = tmp_path_factory.mktemp("mslub")
    paths = {}
    for key, name in (("scan", "T1"), ("lesion", "lesion_mask")):
        img = nib.load(shared_data / "lesion/mslub/patient07" / f"{name}.nii.gz")
        paths[key] = out / f"p07_{name}.nii.gz"
        nib.save(img.slicer[::2, ::2, ::2], paths[key])
    return paths


@pytest.fixture(scope="module")
def ixi_mni(tmp_path_factory, shared_data: Path) -> Path:
    """The CLI run on two raw IXI scans (step 1 of ``benchmarks/protocol_mslub.py``)."""
    out = tmp_path_factory.mktemp("protocol") / "ixi_mni"
    scans = [shared_data / "healthy/ixi_t1" / name for name in IXI]
    assert _cli(*scans, "-o", out) == 0
    return out


def _displacement(a: np.ndarray, b: np.ndarray, template: reg.Template) -> float:
    idx = np.argwhere(template.mask)[::5]
    pts = template.image.affine @ np.c_[idx, np.ones(len(idx))].T
    return float(np.linalg.norm((a @ pts - b @ pts)[:3], axis=0).mean())


def test_registration_recovers_a_known_affine(mslub_2mm, template):
    volume = load_scan(mslub_2mm["scan"])
    base = reg.register_to_template(volume, template, skull_stripped=True)
    again = reg.register_to_template(volume, template, skull_stripped=True)
    np.testing.assert_array_equal(again.matrix, base.matrix)  # seeded: runs repeat exactly
    # a known motion: 8 deg about z, 5 deg about x, scales 1.08/0.95/1.03, a 9 mm shift
    cz, sz, cx, sx = np.cos(0.14), np.sin(0.14), np.cos(0.087), np.sin(0.087)
    lin = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    motion = np.eye(4)
    motion[:3, :3] = lin @ np.diag([1.08, 0.95, 1.03])
    motion[:3, 3] = [6.0, -4.0, 5.0]
    moved = reg.resample(volume.data, volume.affine, volume.shape, volume.affine, motion, antialias=False)
    moved_volume = load_scan(mslub_2mm["scan"])
    moved_volume.data = moved
    found = reg.register_to_template(moved_volume, template, skull_stripped=True)
    # moved(x) = scan(motion x): the template point that maps to y in the scan maps to motion^-1 y
    assert _displacement(found.matrix, np.linalg.inv(motion) @ base.matrix, template) < RECOVERY_TOL_MM
    # MSLUB is only rigidly in MNI space: its brain is scaled up to the template's, barely rotated
    summary = base.summary()
    assert all(1.0 < s < 1.4 for s in summary["scales"]) and summary["rotation_deg"] < 5


def test_transform_json_round_trip_and_bad_file(tmp_path):
    matrix = np.array([[1.1, 0.02, 0, 3], [0, 0.9, 0.1, -2], [0, 0, 1.05, 7], [0, 0, 0, 1]])
    path = reg.AffineTransform(matrix, {"library": "x"}).save(tmp_path / "t.json")
    back = reg.AffineTransform.load(path)
    np.testing.assert_allclose(back.matrix, matrix)
    raw = json.loads(path.read_text())
    np.testing.assert_allclose(np.asarray(raw["scan_to_template"]) @ matrix, np.eye(4), atol=1e-9)
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(reg.PseudohealthyError, match="not a pseudohealthy transform file"):
        reg.AffineTransform.load(tmp_path / "bad.json")
    raw["format"] = "other/2"
    (tmp_path / "other.json").write_text(json.dumps(raw))
    with pytest.raises(reg.PseudohealthyError, match="unknown transform format 'other/2'"):
        reg.AffineTransform.load(tmp_path / "other.json")


def test_template_from_the_shared_1mm_files_matches_the_bundled_mask(shared_data, template):
    full = reg.load_template(shared_data / "healthy/mni152")
    assert full.shape == (197, 233, 189)
    ml_full = full.mask.sum() / 1000.0
    ml_bundled = template.mask.sum() * 8 / 1000.0
    assert abs(ml_full - ml_bundled) / ml_bundled < 0.02
    assert template.shape == MNI_SHAPE


def test_cli_mni_outputs_on_raw_ixi(ixi_mni, shared_data, template):
    out = ixi_mni
    for name in IXI:
        stem = name.removesuffix(".nii.gz")
        image = nib.load(out / f"{stem}_preprocessed.nii.gz")
        mask = nib.load(out / f"{stem}_brainmask.nii.gz")
        for img in (image, mask):
            assert img.shape == MNI_SHAPE
            np.testing.assert_allclose(img.affine, template.image.source_affine)
        data, brain = image.get_fdata(), mask.get_fdata()
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(brain)) == {0, 1}
        assert np.all(data[brain == 0] == 0) and np.percentile(data[brain == 1], 50) > 0
        record = json.loads((out / f"{stem}_transform.json").read_text())
        assert record["format"] == reg.TRANSFORM_FORMAT and record["library"].startswith("SimpleITK")
        assert 900 < record["brain_ml"] < 2000  # an adult brain in the scan's own millimetres
        assert record["template_similarity"]["nmi"] > reg.MIN_NMI
        # registered: the scan correlates with the template inside the brain
        assert np.corrcoef(data[brain == 1], template.image.data[brain == 1])[0, 1] > 0.3
    # the input is untouched
    src = nib.load(shared_data / "healthy/ixi_t1" / IXI[0])
    assert src.shape == (120, 120, 90) and nib.aff2axcodes(src.affine) == ("P", "S", "R")


def test_cli_native_space_keeps_the_input_geometry(mslub_2mm, tmp_path):
    out = tmp_path / "native"
    args = ["--space", "native", "--no-skull-strip", "--masks", mslub_2mm["lesion"]]
    assert _cli(mslub_2mm["scan"], "-o", out, *args) == 0
    src = nib.load(mslub_2mm["scan"])
    for suffix in ("preprocessed", "brainmask", "mask"):
        img = nib.load(out / f"p07_T1_{suffix}.nii.gz")
        assert img.shape == src.shape and nib.aff2axcodes(img.affine) == ("L", "A", "S")
        np.testing.assert_allclose(img.affine, src.affine)
    brain = nib.load(out / "p07_T1_brainmask.nii.gz").get_fdata() > 0
    data = nib.load(out / "p07_T1_preprocessed.nii.gz").get_fdata()
    np.testing.assert_allclose(data[brain], src.get_fdata()[brain], rtol=1e-6)
    lesion = nib.load(out / "p07_T1_mask.nii.gz").get_fdata()
    np.testing.assert_array_equal(lesion > 0, nib.load(mslub_2mm["lesion"]).get_fdata() > 0.5)


def test_atlas_skull_stripping_overlaps_the_mslub_brain(mslub_2mm, tmp_path):
    """The atlas mask (whole-head pipeline) on MSLUB vs its own (expert) brain extraction."""
    out = tmp_path / "strip"
    assert _cli(mslub_2mm["scan"], "-o", out, "--space", "native") == 0
    ours = nib.load(out / "p07_T1_brainmask.nii.gz").get_fdata() > 0
    src = nib.load(mslub_2mm["scan"])
    theirs = src.get_fdata() != 0
    assert _dice(ours, theirs) >= DICE_MIN
    refined = reg.refine_mask(src.get_fdata(), ours, src.affine)  # --refine, on the same registration
    assert refined.sum() <= ours.sum() and _dice(refined, theirs) >= DICE_MIN


def test_cli_mni_space_with_lesion_mask(mslub_2mm, tmp_path, template):
    out = tmp_path / "mni"
    args = [mslub_2mm["scan"], "-o", out, "--no-skull-strip", "--masks", mslub_2mm["lesion"]]
    assert _cli(*args, "--voxel-size", "3") == 0
    lesion = nib.load(out / "p07_T1_mask.nii.gz")
    assert lesion.shape == (61, 73, 61)  # the template's 182 x 218 x 182 mm box at 3 mm
    ml_in = (nib.load(mslub_2mm["lesion"]).get_fdata() > 0.5).sum() * 8 / 1000
    ml_out = (lesion.get_fdata() > 0).sum() * 27 / 1000
    assert 0.8 * ml_in < ml_out < 3.0 * ml_in  # scaled up with the brain, lesions kept


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--space", "native", "--voxel-size", "2"], "--voxel-size applies to --space mni only"),
        (["--brain-mask", "a.nii.gz", "b.nii.gz"], "2 brain mask(s) for 1 scan(s)"),
        (["--no-skull-strip", "--refine"], "--refine tightens the atlas brain mask"),
        (["--masks", "missing.nii.gz"], "mask not found"),
    ],
)
def test_cli_refuses_bad_options(mslub_2mm, tmp_path, capsys, args, message):
    assert _cli(mslub_2mm["scan"], "-o", tmp_path / "o", *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_refuses_bad_input_and_never_overwrites(tmp_path, capsys, mslub_2mm):
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), flat)
    assert _cli(flat, "-o", tmp_path / "o") == 2
    assert "is 2D" in capsys.readouterr().err
    (tmp_path / "notes.nii.gz").write_text("hello")
    assert _cli(tmp_path / "notes.nii.gz", "-o", tmp_path / "o") == 2
    assert "not gzip-compressed" in capsys.readouterr().err
    # a scan whose name is another scan's output, in the output folder itself
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(mslub_2mm["scan"], folder / "a.nii.gz")
    shutil.copy(mslub_2mm["scan"], folder / "a_preprocessed.nii.gz")
    before = (folder / "a_preprocessed.nii.gz").read_bytes()
    assert _cli(folder, "-o", folder) == 2
    assert "refusing to overwrite an input" in capsys.readouterr().err
    assert (folder / "a_preprocessed.nii.gz").read_bytes() == before


def test_a_non_brain_scan_is_flagged(make_nifti, tmp_path):
    scan = make_nifti(phantom((40, 40, 30)), name="phantom.nii.gz")
    with pytest.warns(ScanWarning, match="barely resembles the template"):
        assert _cli(scan, "-o", tmp_path / "o", "--no-skull-strip") == 0


def test_missing_simpleitk_says_how_to_install(monkeypatch, mslub_2mm, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    assert _cli(mslub_2mm["scan"], "-o", tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert "pip install 'pseudohealthy[preprocess]'" in err and len(err.strip().splitlines()) == 1
