"""napari plugin I/O: manifest, reader geometry, label detection, writer round trip, axis mapping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")

from pseudohealthy.data.io import load_scan, to_source
from pseudohealthy.data.sample import demo_ensemble_path, sample_mask_path, sample_scan_path
from pseudohealthy.napari._layers import (
    canonical_view,
    current_axial_index,
    go_to_axial,
    layer_affine,
    layer_frame,
    layer_volume,
    show_axial,
)
from pseudohealthy.napari._reader import napari_get_reader, read_one
from pseudohealthy.napari._writer import write_image, write_labels

REPO = Path(__file__).resolve().parents[1]
BRATS = "lesion/brats2013/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"

pytestmark = pytest.mark.gui


@pytest.fixture
def brats(shared_data: Path) -> Path:
    return shared_data / BRATS


def test_manifest_validates() -> None:
    import npe2

    manifest = npe2.PluginManifest.from_file(REPO / "napari.yaml")
    assert manifest.name == "pseudohealthy"
    contrib = manifest.contributions
    assert {w.display_name for w in contrib.widgets} == {"Pseudo-healthy restoration", "Anomaly threshold"}
    assert {tuple(w.layer_types) for w in contrib.writers} == {("image",), ("labels",)}
    assert contrib.readers[0].filename_patterns == ["*.nii", "*.nii.gz"]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "npe2"), "validate", str(REPO / "napari.yaml")],
        capture_output=True,
        encoding="utf-8",
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # every command resolves to an importable Python object
    for command in contrib.commands:
        module, attr = command.python_name.split(":")
        assert callable(getattr(__import__(module, fromlist=[attr]), attr)), command.id


def test_installed_plugin_is_discovered() -> None:
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("pseudohealthy")  # registered through the napari.manifest entry point
    assert {c.id for c in manifest.contributions.commands} >= {
        "pseudohealthy.get_reader",
        "pseudohealthy.restore_widget",
    }


def test_sample_paths_exist() -> None:
    assert sample_scan_path().is_file() and sample_mask_path().is_file()
    assert nib.load(sample_scan_path()).shape == nib.load(sample_mask_path()).shape
    assert demo_ensemble_path() is None or demo_ensemble_path().is_dir()


def test_get_reader_accepts_only_nifti(tmp_path: Path) -> None:
    assert napari_get_reader("scan.nii.gz") is not None
    assert napari_get_reader(["a.nii", "b.NII.GZ"]) is not None
    assert napari_get_reader("scan.tif") is None
    assert napari_get_reader(["a.nii", "b.png"]) is None


def _same_physical_voxels(layer, path: Path) -> None:
    """Each stored voxel of the file sits at the same world mm, with the same value, in the layer."""
    img = nib.load(path)
    stored = np.asarray(img.dataobj)
    inv = np.linalg.inv(layer_affine(layer))
    far = np.array(img.shape) - 1
    for voxel in (np.zeros(3), far, np.array([far[0], 0, far[2]]), np.array([3.0, far[1] - 2, 5.0])):
        world = (img.affine @ [*voxel, 1])[:3]
        np.testing.assert_allclose(layer.data_to_world((inv @ [*world, 1])[:3]), world, atol=1e-5)
        index = (inv @ [*world, 1])[:3]
        np.testing.assert_allclose(index, np.round(index), atol=1e-6)  # lands on a layer voxel
        assert layer.data[tuple(np.round(index).astype(int))] == stored[tuple(voxel.astype(int))]


def test_reader_canonical_geometry(make_napari_viewer, brats: Path) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(brats), plugin="pseudohealthy")
    img = nib.load(brats)  # stored LPS
    canon = nib.as_closest_canonical(img)
    assert layer.data.shape == canon.shape
    np.testing.assert_array_equal(layer.data, canon.get_fdata(dtype=np.float32))
    np.testing.assert_allclose(layer_affine(layer), canon.affine, atol=1e-6)
    # voxel (0,0,0) and the far corner of the file are where nibabel's affine puts them
    _same_physical_voxels(layer, brats)
    meta = layer.metadata
    assert meta["source_path"] == str(brats.resolve())
    np.testing.assert_allclose(meta["source_affine"], img.affine)
    np.testing.assert_allclose(meta["nifti_affine"], canon.affine)
    assert meta["nifti_header"]["dim"][1:4] == list(img.shape)
    assert isinstance(meta["nifti_header"]["descrip"], str)
    assert [str(u) for u in layer.units] == ["millimeter"] * 3
    # shown axially: the slider is the S axis, anterior up, patient's right on the left
    show_axial(viewer)
    assert tuple(viewer.dims.not_displayed) == (2,)
    assert tuple(viewer.dims.displayed) == (1, 0)
    assert tuple(str(o) for o in viewer.scene.camera.orientation2d) == ("up", "left")


def test_label_files_open_as_labels(make_nifti, tmp_path: Path, brats: Path) -> None:
    seg = (np.arange(32 * 32 * 12).reshape(32, 32, 12) % 3).astype(np.int16)
    path = make_nifti(seg, name="case_seg.nii.gz")
    data, _, kind = read_one(path)
    assert kind == "labels" and data.dtype == np.uint8
    np.testing.assert_array_equal(data, seg)
    # an integer file with many values and no label-like name is an image
    scan = (np.arange(32 * 32 * 12).reshape(32, 32, 12) % 500).astype(np.int16)
    assert read_one(make_nifti(scan, name="t1.nii.gz"))[2] == "image"
    # float-valued scans are images even with an integer-looking name part
    assert read_one(brats)[2] == "image"
    assert read_one(sample_mask_path())[2] == "labels"


def test_reader_reports_bad_files(tmp_path: Path) -> None:
    from pseudohealthy.errors import ScanError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(ScanError, match=r"broken\.nii\.gz"):
        read_one(bad)


def test_axial_index_mapping_on_lps_scan(make_napari_viewer, brats: Path) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(brats), plugin="pseudohealthy")
    img = nib.load(brats)
    # the same file as a stored-order (L, P flipped) layer with the file's own affine
    stored = viewer.add_image(
        img.get_fdata(dtype=np.float32), affine=img.affine, metadata={"nifti_affine": img.affine.tolist()}
    )
    show_axial(viewer)
    canon = nib.as_closest_canonical(img)
    vol = load_scan(brats)
    for lay in (layer, stored):
        frame = layer_frame(lay)
        np.testing.assert_allclose(frame.affine, canon.affine, atol=1e-6)
        assert frame.shape == canon.shape
        for k in (0, 40, 100, canon.shape[2] - 1):
            viewer.dims.set_point(2, (canon.affine @ [0, 0, k, 1])[2])
            assert current_axial_index(viewer, lay, frame) == k
        # jumping to a slice puts that canonical slice on screen
        go_to_axial(viewer, lay, frame, 77)
        assert current_axial_index(viewer, lay, frame) == 77
        # canonical views (no copy) of the layer data are the io module's canonical arrays
        view = canonical_view(lay.data, frame)
        np.testing.assert_array_equal(view, vol.data)
        assert np.shares_memory(view, lay.data)
        # the layer as a Volume has the same canonical data and affine as load_scan
        lv = layer_volume(lay)
        np.testing.assert_array_equal(lv.data, vol.data)
        np.testing.assert_allclose(lv.affine, vol.affine, atol=1e-6)
    # writing into the canonical view of the stored-order layer lands where io.to_source puts it
    marker = np.zeros(vol.shape, dtype=np.float32)
    marker[10, 20, 30] = 1
    target = np.zeros_like(stored.data)
    canonical_view(target, layer_frame(stored))[...] = marker
    np.testing.assert_array_equal(target, to_source(marker, vol))
    assert target[target.shape[0] - 11, target.shape[1] - 21, 30] == 1  # L and P flipped


def test_permuted_scan_opens_canonically(make_napari_viewer, make_nifti, tmp_path: Path) -> None:
    """A PSR scan (IXI-like): stored axis 0 is P, axis 2 is R."""
    affine = np.array([[0, 0, 2.0, -60], [-2.0, 0, 0, 70], [0, -2.0, 0, 40], [0, 0, 0, 1]])
    data = np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)
    path = make_nifti(data, affine=affine)
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(path), plugin="pseudohealthy")
    show_axial(viewer)
    canon = nib.as_closest_canonical(nib.load(path))
    frame = layer_frame(layer)
    assert layer.data.shape == frame.shape == canon.shape == (14, 10, 12)
    _same_physical_voxels(layer, path)
    for k in (0, 5, 11):
        viewer.dims.set_point(2, (canon.affine @ [0, 0, k, 1])[2])
        assert current_axial_index(viewer, layer, frame) == k
    # written back in the file's stored (PSR) order and affine
    out = tmp_path / "back.nii.gz"
    write_image(str(out), layer.data, layer.as_layer_data_tuple()[1])
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(back.get_fdata(dtype=np.float32), data)


def test_plain_layers_slice_along_the_first_axis(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    data = np.random.default_rng(1).random((6, 20, 24)).astype(np.float32)
    layer = viewer.add_image(data, scale=(3.0, 1.0, 1.0))
    viewer.dims.set_point(0, 9.0)  # napari's slider on axis 0, step 3
    frame = layer_frame(layer)
    assert frame.shape[2] == 6
    assert current_axial_index(viewer, layer, frame) == 3
    np.testing.assert_array_equal(canonical_view(layer.data, frame)[:, :, 3].T, data[3])


def test_writer_round_trips_geometry(make_napari_viewer, brats: Path, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    (layer,) = viewer.open(str(brats), plugin="pseudohealthy")
    out = tmp_path / "copy.nii.gz"
    written = write_image(str(out), layer.data, layer.as_layer_data_tuple()[1])
    assert written == [str(out)]
    back = nib.load(out)
    src = nib.load(brats)
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-5)
    assert back.shape == src.shape
    np.testing.assert_allclose(back.get_fdata(), src.get_fdata(), atol=1e-5)
    assert back.header["descrip"] == src.header["descrip"]  # the source header was kept
    # a labels layer derived from it (geometry copied) is written in the same grid
    mask = (layer.data > 2).astype(np.uint8)
    labels = viewer.add_labels(mask, affine=layer.affine, metadata=dict(layer.metadata))
    out2 = tmp_path / "mask.nii.gz"
    write_labels(str(out2), labels.data, labels.as_layer_data_tuple()[1])
    back2 = nib.load(out2)
    np.testing.assert_allclose(back2.affine, src.affine, atol=1e-5)
    assert back2.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back2.dataobj), to_source(mask, load_scan(brats)))
    # refuses to overwrite the input scan
    from pseudohealthy.errors import ScanError

    with pytest.raises(ScanError, match="overwrite"):
        write_image(str(brats), layer.data, layer.as_layer_data_tuple()[1])


def test_writer_plain_layer_and_napari_save(make_napari_viewer, tmp_path: Path) -> None:
    viewer = make_napari_viewer()
    data = np.random.default_rng(2).random((5, 8, 9)).astype(np.float32)
    layer = viewer.add_image(data, scale=(2.0, 0.5, 0.5), translate=(10.0, 0.0, -4.0), name="plain")
    out = tmp_path / "plain.nii.gz"
    viewer.layers.selection = {layer}
    viewer.layers.save(str(out), selected=True, plugin="pseudohealthy")
    img = nib.load(out)
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)
    # world axis 0 (napari's slider) became the S axis; voxel -> mm as napari placed it
    corner = np.array([4, 7, 8])
    world = np.asarray(layer.data_to_world(corner))
    np.testing.assert_allclose((img.affine @ [*corner, 1])[:3], world[::-1])
    # reading it back gives the canonical (x, y, z) = (axis 2, axis 1, axis 0) array
    data2, _, _ = read_one(out)
    np.testing.assert_array_equal(data2, data.transpose(2, 1, 0))


def test_sample_data_contribution(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    viewer.open_sample("pseudohealthy", "brats_flair")
    names = [lay.name for lay in viewer.layers]
    assert names == ["brats2013_pat0006_flair", "brats2013_pat0006_flair ground truth"]
    scan, lesion = viewer.layers
    assert lesion.data.dtype == np.uint8 and lesion.data.max() == 1
    np.testing.assert_allclose(
        layer_affine(scan), nib.as_closest_canonical(nib.load(sample_scan_path())).affine
    )
    _same_physical_voxels(scan, sample_scan_path())
