"""DICOM in (`pseudohealthy.data.dicom` through `load_scan`): the raw oblique MPRAGE series against
SimpleITK's own geometry, NIfTI outputs in the series' grid, the napari reader, `preprocess` on
the folder, scan discovery, and the one-line refusals (no series, several, unreadable, no SimpleITK)."""

from __future__ import annotations

import json
import locale
import sys
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK", reason="DICOM reading needs the preprocess extra (SimpleITK)")

from pseudohealthy.cli import main  # noqa: E402
from pseudohealthy.cli.restore import collect_scans  # noqa: E402
from pseudohealthy.data.dataset import find_scans  # noqa: E402
from pseudohealthy.data.io import is_dicom_folder, load_scan, save_like, scan_name  # noqa: E402
from pseudohealthy.errors import ScanError  # noqa: E402

SERIES = "dicom/trio_t1_mprage"
GEOMETRY_TOL_MM = 1e-4
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def series_dir(request) -> Path:
    return request.getfixturevalue("shared_data") / SERIES


@pytest.fixture(scope="module")
def reference(series_dir: Path):
    """The series as SimpleITK reads it on its own (GDCM's series IDs and slice order)."""
    (uid,) = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(series_dir))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir), uid))
    return reader.Execute()


@pytest.fixture(scope="module")
def volume(series_dir: Path):
    return load_scan(series_dir)


def _indices(size) -> list[tuple[int, int, int]]:
    """Corners, the centre and a few inner voxels of an ITK index grid."""
    i, j, k = (int(s) - 1 for s in size)
    corners = [(a, b, c) for a in (0, i) for b in (0, j) for c in (0, k)]
    return [*corners, (i // 2, j // 2, k // 2), (17, 201, 33), (130, 40, 150), (i - 3, 5, k // 3)]


def _world_error(affine: np.ndarray, source_index, reference, canonical_index=None) -> float:
    """|our RAS position - SimpleITK's LPS position with x, y flipped| of one voxel (mm)."""
    expected = np.asarray(reference.TransformIndexToPhysicalPoint(tuple(int(v) for v in source_index)))
    index = source_index if canonical_index is None else canonical_index
    ours = (affine @ np.r_[np.asarray(index, dtype=float), 1.0])[:3]
    return float(np.abs(ours - expected * LPS_TO_RAS).max())


def _canonical_index(volume, source_index) -> tuple[int, int, int]:
    """The canonical voxel at the same world position as a source (stored) voxel."""
    world = volume.source_affine @ np.r_[np.asarray(source_index, dtype=float), 1.0]
    canon = np.linalg.solve(volume.affine, world)[:3]
    assert np.allclose(canon, np.round(canon), atol=1e-6)  # a permutation/flip of the same grid
    return tuple(int(v) for v in np.round(canon))


def test_geometry_and_voxels_equal_simpleitk(volume, reference, series_dir):
    ref = sitk.GetArrayFromImage(reference)  # (k, j, i)
    assert volume.source_shape == tuple(reference.GetSize()) == (256, 256, 176)
    assert volume.name == "trio_t1_mprage" and volume.path == series_dir
    worst = 0.0
    for index in _indices(reference.GetSize()):
        canon = _canonical_index(volume, index)
        worst = max(worst, _world_error(volume.source_affine, index, reference))
        worst = max(worst, _world_error(volume.affine, index, reference, canon))
        assert volume.data[canon] == np.float32(ref[index[2], index[1], index[0]])
    assert worst < GEOMETRY_TOL_MM, worst
    # oblique (about 6 degrees), kept: neither affine is a permutation of the axes
    direction = np.asarray(reference.GetDirection()).reshape(3, 3)
    tilt = np.degrees(np.arccos(np.abs(direction).max(axis=0).min()))
    assert 4 < tilt < 8
    assert not np.allclose(np.abs(volume.affine[:3, :3]), np.eye(3), atol=1e-2)
    assert sorted(np.round(volume.spacing, 6)) == [1.0, 1.0, 1.0]
    assert float(volume.data.sum()) == pytest.approx(float(ref.astype(np.float64).sum()), rel=1e-6)


def test_save_like_writes_the_series_geometry(volume, reference, tmp_path):
    out = save_like(volume.data, volume, tmp_path / "out.nii.gz")
    back = sitk.ReadImage(str(out))
    assert back.GetSize() == reference.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), reference.GetSpacing(), atol=GEOMETRY_TOL_MM)
    np.testing.assert_allclose(back.GetOrigin(), reference.GetOrigin(), atol=GEOMETRY_TOL_MM)
    np.testing.assert_allclose(back.GetDirection(), reference.GetDirection(), atol=GEOMETRY_TOL_MM)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reference))
    again = load_scan(out)  # and back through our NIfTI reader: the same canonical volume
    np.testing.assert_allclose(again.affine, volume.affine, atol=GEOMETRY_TOL_MM)
    np.testing.assert_array_equal(again.data, volume.data)
    with pytest.raises(ScanError, match="already exists"):
        save_like(volume.data, volume, out)


def test_napari_reader_opens_the_folder_with_the_same_affine(volume, reference, series_dir):
    pytest.importorskip("napari")
    from pseudohealthy.napari._reader import napari_get_reader

    reader = napari_get_reader(str(series_dir))
    assert reader is not None
    assert napari_get_reader(str(series_dir.parent)) is None  # a folder without a series: not ours
    ((data, kwargs, kind),) = reader(str(series_dir))
    assert kind == "image" and kwargs["name"] == "trio_t1_mprage"
    np.testing.assert_array_equal(data, volume.data)
    np.testing.assert_allclose(kwargs["affine"], volume.affine)
    for index in _indices(reference.GetSize())[:4]:
        canon = _canonical_index(volume, index)
        assert _world_error(np.asarray(kwargs["affine"]), index, reference, canon) < GEOMETRY_TOL_MM
    meta = kwargs["metadata"]
    assert meta["dicom"]["series_description"] == "t1_MPRAGEcr_noGRAPPA"
    np.testing.assert_allclose(meta["source_affine"], volume.source_affine)


def test_manifest_has_a_folder_reader():
    import npe2

    manifest = npe2.PluginManifest.from_file(Path(__file__).resolve().parents[1] / "napari.yaml")
    readers = manifest.contributions.readers
    assert readers[0].filename_patterns == ["*.nii", "*.nii.gz"]
    assert any(r.accepts_directories for r in readers)


def test_preprocess_round_trip_into_the_template(series_dir, volume, tmp_path):
    from pseudohealthy.data import registration as reg

    out = tmp_path / "mni"
    assert main(["-q", "preprocess", str(series_dir), "-o", str(out)]) == 0
    template = reg.load_template()
    image = load_scan(out / "trio_t1_mprage_preprocessed.nii.gz")
    np.testing.assert_allclose(image.source_affine, template.image.source_affine)
    record = json.loads((out / "trio_t1_mprage_transform.json").read_text())
    assert record["scan"] == str(series_dir)
    assert 900 < record["brain_ml"] < 2200  # an adult brain, in the series' millimetres
    assert record["template_similarity"]["nmi"] > reg.MIN_NMI
    brain = template.mask > 0
    assert np.corrcoef(image.data[brain], template.image.data[brain])[0, 1] > 0.3
    # back: the template's brain centre maps (template -> scan) into the series' head
    transform = reg.AffineTransform.load(out / "trio_t1_mprage_transform.json")
    centre = template.image.affine @ np.r_[np.argwhere(brain).mean(axis=0), 1.0]
    index = np.linalg.solve(volume.affine, transform.matrix @ centre)[:3]
    assert np.all(index > 0) and np.all(index < np.asarray(volume.shape) - 1)
    assert volume.data[tuple(np.round(index).astype(int))] > np.percentile(volume.data, 50)


def test_preprocess_native_space_writes_in_the_series_geometry(series_dir, reference, tmp_path):
    out = tmp_path / "native"
    assert main(["-q", "preprocess", str(series_dir), "-o", str(out), "--space", "native"]) == 0
    back = sitk.ReadImage(str(out / "trio_t1_mprage_preprocessed.nii.gz"))
    assert back.GetSize() == reference.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), reference.GetOrigin(), atol=GEOMETRY_TOL_MM)
    np.testing.assert_allclose(back.GetDirection(), reference.GetDirection(), atol=GEOMETRY_TOL_MM)


# --- synthetic series: known geometry, several series, broken files ---------------------------------


def _write_series(
    folder: Path, uid: str, description: str, *, n: int = 5, seed: int = 0, prefix: str = "IM"
) -> np.ndarray:
    """A small oblique MR series (n slices of 8x6, int16) written file by file; returns its voxels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    voxels = rng.integers(0, 1000, size=(n, 6, 8), dtype=np.int16)  # (k, j, i)
    angle = np.radians(10.0)
    direction = np.array(
        [[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]], dtype=float
    )
    spacing, origin = np.array([0.9, 1.1, 2.5]), np.array([-20.0, 15.0, 30.0])
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    order = rng.permutation(n)  # files named out of slice order: the reader sorts by position
    for k in range(n):
        slice_img = sitk.GetImageFromArray(voxels[k : k + 1])
        position = origin + direction[:, 2] * spacing[2] * k
        slice_img.SetSpacing(spacing.tolist())
        slice_img.SetOrigin(position.tolist())
        slice_img.SetDirection(direction.ravel().tolist())
        tags = {
            "0008|0060": "MR",
            "0008|103e": description,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": uid,
            "0020|0011": "1",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])),
            "0018|0050": f"{spacing[2]:.6f}",
            "0008|0018": f"{uid}.{k + 1}",
        }
        for key, value in tags.items():
            slice_img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{order[k]:04d}.dcm"))
        saved = locale.setlocale(locale.LC_ALL)
        try:
            writer.Execute(slice_img)
        finally:  # GDCM's writer leaves the process in the "C" locale (ASCII text decoding)
            locale.setlocale(locale.LC_ALL, saved)
    return voxels


UID_A = "1.2.826.0.1.3680043.2.1125.11"
UID_B = "1.2.826.0.1.3680043.2.1125.22"


def test_a_synthetic_oblique_series_reads_in_slice_order(tmp_path):
    voxels = _write_series(tmp_path / "s", UID_A, "t1_small")
    volume = load_scan(tmp_path / "s")
    ref = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "s"), UID_A))
    assert volume.source_shape == (8, 6, 5)
    for index in [(0, 0, 0), (7, 5, 4), (3, 2, 1), (1, 4, 3)]:
        assert _world_error(volume.source_affine, index, ref) < GEOMETRY_TOL_MM
        canon = _canonical_index(volume, index)
        assert volume.data[canon] == voxels[index[2], index[1], index[0]]
    assert sorted(np.round(volume.spacing, 4)) == [0.9, 1.1, 2.5]


def test_no_series_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScanError, match="empty folder: no DICOM series") as err:
        load_scan(tmp_path / "empty")
    assert "\n" not in str(err.value)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    with pytest.raises(ScanError, match=r"no DICOM series in the folder \(none of its 1 file\(s\) is DICOM"):
        load_scan(tmp_path / "notes")
    with pytest.raises(ScanError, match="folder not found"):
        load_scan(tmp_path / "nope::1")


def test_several_series_list_themselves_and_say_how_to_choose(tmp_path):
    folder = tmp_path / "study"
    a = _write_series(folder, UID_A, "t1_small", seed=1)
    b = _write_series(folder, UID_B, "flair_small", n=3, seed=2, prefix="B")
    with pytest.raises(ScanError) as err:
        load_scan(folder)
    message = str(err.value)
    assert "\n" not in message and "holds 2 DICOM series" in message
    assert UID_A in message and UID_B in message and "flair_small" in message and "t1_small" in message
    assert f"{folder}::SERIES_UID" in message and "its own folder" in message
    chosen = load_scan(f"{folder}::{UID_B}")
    assert chosen.source_shape == (8, 6, 3) and chosen.path == folder
    np.testing.assert_array_equal(chosen.data.sum(), b.sum())
    by_description = load_scan(f"{folder}::t1_small")
    assert float(by_description.data.sum()) == float(a.sum())
    assert scan_name(f"{folder}::{UID_B}") == f"study_{UID_B}"
    with pytest.raises(ScanError, match="no series '9' among its 2 DICOM series"):
        load_scan(f"{folder}::9")


def test_unreadable_and_inconsistent_series(tmp_path):
    _write_series(tmp_path / "broken", UID_A, "t1_small", n=6)
    victim = sorted((tmp_path / "broken").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: dropped or unreadable
    with pytest.raises(ScanError, match=r"1 DICOM file\(s\) cannot be read \(truncated or corrupt\)") as err:
        load_scan(tmp_path / "broken")
    assert "\n" not in str(err.value) and victim.name in str(err.value)
    _write_series(tmp_path / "gap", UID_A, "t1_small", n=6)
    files = sorted((tmp_path / "gap").iterdir(), key=lambda p: sitk.ReadImage(str(p)).GetOrigin()[2])
    files[3].unlink()  # a missing slice in the middle
    with pytest.raises(ScanError, match="unevenly spaced slices"):
        load_scan(tmp_path / "gap")


def test_missing_simpleitk_says_what_to_install(monkeypatch, tmp_path):
    _write_series(tmp_path / "s", UID_A, "t1_small")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)
    with pytest.raises(ScanError, match=r"needs SimpleITK.*pip install 'pseudohealthy\[preprocess\]'") as err:
        load_scan(tmp_path / "s")
    assert "\n" not in str(err.value)


def test_discovery_takes_a_series_folder_as_one_scan(tmp_path):
    _write_series(tmp_path / "patient" / "t1", UID_A, "t1_small")
    _write_series(tmp_path / "patient" / "flair", UID_B, "flair_small")
    nifti = tmp_path / "patient" / "scan.nii.gz"
    t1 = load_scan(tmp_path / "patient" / "t1")
    save_like(t1.data, t1, nifti)
    assert is_dicom_folder(tmp_path / "patient" / "t1") and not is_dicom_folder(tmp_path / "patient")
    assert collect_scans([tmp_path / "patient" / "t1"]) == [tmp_path / "patient" / "t1"]
    assert collect_scans([tmp_path / "patient"]) == [
        nifti,
        tmp_path / "patient" / "flair",
        tmp_path / "patient" / "t1",
    ]
    assert find_scans([tmp_path / "patient" / "t1"]) == [(tmp_path / "patient" / "t1").resolve()]
    assert find_scans([tmp_path / "patient"]) == [
        nifti.resolve(),
        (tmp_path / "patient" / "flair").resolve(),
        (tmp_path / "patient" / "t1").resolve(),
    ]
    choice = f"{tmp_path / 'patient' / 't1'}::1"
    assert find_scans([choice]) == [Path(choice).resolve()]


def test_cli_reports_a_bad_folder_in_one_line(tmp_path, capsys):
    folder = tmp_path / "study"
    _write_series(folder, UID_A, "t1_small")
    _write_series(folder, UID_B, "flair_small", prefix="B")
    assert main(["-q", "preprocess", str(folder), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds 2 DICOM series" in err
    assert len([line for line in err.splitlines() if "DICOM series" in line]) == 1


def test_a_test_set_folder_can_hold_dicom_series(tmp_path):
    from pseudohealthy.evaluation.testsets import cases_from_dir

    for case in ("c1", "c2"):
        _write_series(tmp_path / case / "t1", UID_A, "t1_small")
        (tmp_path / case / "lesion.nii.gz").touch()
    cases = cases_from_dir(tmp_path, "*/t1", "lesion.nii.gz")
    assert [(c.scan, c.mask, c.name) for c in cases] == [
        (tmp_path / "c1" / "t1", tmp_path / "c1" / "lesion.nii.gz", "c1_t1"),
        (tmp_path / "c2" / "t1", tmp_path / "c2" / "lesion.nii.gz", "c2_t1"),
    ]
