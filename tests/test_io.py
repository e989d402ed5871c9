"""io.py: canonical loading, exact write-back in the source grid, and one test per bad input."""

from __future__ import annotations

import gzip
import os
import warnings

import nibabel as nib
import numpy as np
import pytest

from conftest import phantom, write_nifti
from pseudohealthy.data.io import load_mask, load_scan, save_like, scan_name, to_source, volume_from_array
from pseudohealthy.errors import ScanError, ScanWarning

ORIENTED = {
    "PSR": "healthy/ixi_t1/IXI260-HH-1805_T1.nii.gz",
    "RAS": "healthy/mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "LAS": "lesion/mslub/patient07/T1.nii.gz",
    "LPS": "lesion/brats2013/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz",
}


@pytest.mark.parametrize("codes", list(ORIENTED))
def test_round_trip_real_orientation(shared_data, tmp_path, codes):
    src = shared_data / ORIENTED[codes]
    raw = nib.load(src)
    assert "".join(nib.aff2axcodes(raw.affine)) == codes
    vol = load_scan(src)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    assert vol.data.dtype == np.float32 and vol.source_shape == raw.shape
    assert np.allclose(vol.affine, nib.as_closest_canonical(raw).affine)
    out = save_like(vol.data, vol, tmp_path / f"out_{codes}.nii")
    back = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), raw.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(back.affine, raw.affine)
    assert nib.aff2axcodes(back.affine) == nib.aff2axcodes(raw.affine)
    for key in ("sform_code", "qform_code", "pixdim", "xyzt_units"):
        np.testing.assert_array_equal(back.header[key], raw.header[key])
    np.testing.assert_allclose(back.header.get_sform(), raw.header.get_sform(), atol=1e-6)
    np.testing.assert_allclose(back.header.get_qform(), raw.header.get_qform(), atol=1e-5)


def test_axial_slice_is_superior_axis(shared_data):
    vol = load_scan(shared_data / ORIENTED["PSR"])
    # IXI is stored (P, S, R) 120x120x90 at 2 mm: canonical (R, A, S) is (90, 120, 120).
    assert vol.data.shape == (90, 120, 120)
    assert vol.spacing == (2.0, 2.0, 2.0)
    assert vol.name == "IXI260-HH-1805_T1"
    z = vol.affine @ np.array([[0, 0, 0, 1], [0, 0, 1, 1]]).T
    assert z[2, 1] - z[2, 0] == pytest.approx(2.0)  # stepping k moves superior


def test_oblique_affine_round_trip(tmp_path):
    rot = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]])
    c, s = np.cos(0.3), np.sin(0.3)
    tilt = np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    affine = np.eye(4)
    affine[:3, :3] = tilt @ rot @ np.diag([1.2, 0.9, 2.5])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    data = phantom((20, 14, 9))
    src = write_nifti(tmp_path / "oblique.nii.gz", data, affine)
    vol = load_scan(src)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    # world coordinates of every voxel are preserved by the reorientation
    ijk = np.argwhere(vol.data == vol.data.max())[0]
    src_ijk = np.linalg.solve(affine, vol.affine @ np.r_[ijk, 1])[:3]
    assert vol.data[tuple(ijk)] == data[tuple(np.rint(src_ijk).astype(int))]
    out = save_like(vol.data * 2, vol, tmp_path / "sub" / "out.nii.gz")
    back = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data * 2)
    np.testing.assert_allclose(back.affine, nib.load(src).affine, atol=1e-6)


def test_mask_dtype_and_no_scaling(tmp_path):
    vol = load_scan(write_nifti(tmp_path / "scan.nii.gz", phantom() * 1000, dtype=np.int16))
    mask = vol.data > 400
    out = save_like(mask, vol, tmp_path / "mask.nii.gz", dtype=np.uint8)
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    stored = np.asanyarray(back.dataobj)
    assert stored.dtype == np.uint8 and set(np.unique(stored)) == {0, 1}
    np.testing.assert_array_equal(stored.astype(bool), to_source(mask, vol))
    # float values are stored as given, never rescaled into the source's int16 range
    out = save_like(vol.data / 1000.0, vol, tmp_path / "float.nii.gz")
    assert nib.load(out).get_data_dtype() == np.float32
    np.testing.assert_allclose(np.asanyarray(nib.load(out).dataobj), vol.data / 1000.0, rtol=1e-6)


def test_four_d_single_volume_is_squeezed(make_nifti, tmp_path):
    data = phantom()[..., None]
    vol = load_scan(make_nifti(data, "one.nii.gz"))
    assert vol.data.shape == data.shape[:3]
    out = save_like(vol.data, vol, tmp_path / "back.nii.gz")
    np.testing.assert_array_equal(nib.load(out).get_fdata(), data[..., 0])


def test_load_mask_real(shared_data):
    case = shared_data / "lesion/brats2013/brats_2013_pat0003_1"
    vol = load_scan(case / "Flair_subtrMeanDivStd.nii.gz")
    mask = load_mask(case / "brainmask.nii.gz", vol)
    assert mask.dtype == bool and mask.shape == vol.data.shape
    raw = nib.as_closest_canonical(nib.load(case / "brainmask.nii.gz")).get_fdata() > 0.5
    np.testing.assert_array_equal(mask, raw)


def test_load_mask_shape_mismatch(make_nifti):
    vol = load_scan(make_nifti())
    bad = make_nifti(np.zeros((10, 10, 10), np.uint8), "mask.nii.gz")
    with pytest.raises(ScanError, match=r"mask\.nii\.gz.*does not match"):
        load_mask(bad, vol)
    empty = load_mask(make_nifti(np.zeros((32, 32, 12), np.uint8), "empty.nii.gz"), vol)
    assert not empty.any()  # an empty mask is fine (a constant scan is not)


def test_volume_from_array():
    vol = volume_from_array(np.arange(12, dtype=float).reshape(3, 4))
    assert vol.data.shape == (3, 4, 1) and vol.name == "array" and vol.path is None
    flipped = volume_from_array(phantom(), affine=np.diag([-1.0, 1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(flipped.data, phantom()[::-1])
    np.testing.assert_array_equal(to_source(flipped.data, flipped), phantom())
    with pytest.raises(ScanError, match="same value"):
        volume_from_array(np.ones((4, 4, 4)))


def test_scan_name():
    assert scan_name("/a/b/T1.nii.gz") == "T1" and scan_name("x.y.nii") == "x.y"


# ---- bad inputs: each error names the file and the problem ------------------------------------


def _fails(path, problem):
    with pytest.raises(ScanError, match=problem) as info:
        load_scan(path)
    assert str(path) in str(info.value) and info.value.path == path
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    _fails(tmp_path / "nope.nii.gz", "file not found")


def test_directory(tmp_path):
    (tmp_path / "dir.nii").mkdir()
    _fails(tmp_path / "dir.nii", "directory")


def test_wrong_extension(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(400))
    _fails(path, "not a NIfTI file")


def test_text_renamed_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("not an image at all\n" * 50)
    _fails(path, "not a NIfTI file.*not gzip")


def test_png_renamed_nii(tmp_path):
    path = tmp_path / "photo.nii"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(600))
    _fails(path, "not a NIfTI file")


def test_gzipped_png_renamed_nii_gz(tmp_path):
    path = tmp_path / "photo.nii.gz"
    path.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(600)))
    _fails(path, "not a NIfTI file")


def test_truncated_gzip(make_nifti):
    path = make_nifti(name="full.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _fails(path, "truncated")


def test_truncated_gzip_header(make_nifti):
    path = make_nifti(name="full.nii.gz")
    path.write_bytes(path.read_bytes()[:60])
    _fails(path, "truncated")


def test_truncated_uncompressed(make_nifti):
    path = make_nifti(name="full.nii")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    _fails(path, "truncated")


def test_two_d_image(make_nifti):
    _fails(make_nifti(np.random.default_rng(0).random((16, 16)), "flat.nii.gz"), "is 2D")


def test_four_d_many_volumes(make_nifti):
    _fails(make_nifti(np.random.default_rng(0).random((8, 8, 4, 3)), "series.nii.gz"), "4D with 3 volumes")


def test_constant_image(make_nifti):
    _fails(make_nifti(np.full((8, 8, 4), 7.0, np.float32), "const.nii.gz"), "same value")


def test_nan_and_inf_replaced_with_warning(make_nifti):
    data = phantom()
    data[0, 0, 0], data[5, 5, 5], data[6, 6, 6] = np.nan, np.inf, -np.inf
    path = make_nifti(data, "nan.nii.gz")
    with pytest.warns(ScanWarning, match=r"nan\.nii\.gz.*3 NaN/Inf"):
        vol = load_scan(path)
    assert np.isfinite(vol.data).all()
    finite_min = np.nanmin(np.where(np.isfinite(data), data, np.nan))
    assert vol.data.min() == finite_min
    assert np.count_nonzero(vol.data == finite_min) >= 3


def test_all_nan(make_nifti):
    _fails(make_nifti(np.full((8, 8, 4), np.nan, np.float32), "allnan.nii.gz"), "no finite voxel")


def test_dimension_too_large(make_nifti):
    _fails(
        make_nifti(np.random.default_rng(0).random((2049, 2, 2)).astype(np.float32), "long.nii"),
        "absurd size",
    )


def test_too_many_voxels_checked_before_reading(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.uint8)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as fh:  # a header that claims 1 GiB of voxels, with almost none stored
        header.write_to(fh)
        fh.write(bytes(104))
    _fails(path, "absurd size")


def test_slice_plane_too_small(make_nifti):
    _fails(
        make_nifti(np.random.default_rng(0).random((1, 16, 8)), "sliver.nii.gz"), "axial slices would be 1x16"
    )


def _with_sform(tmp_path, name, affine):
    header = nib.Nifti1Header()
    header.set_sform(affine, code=2)
    header.set_qform(np.eye(4), code=0)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(phantom(), None, header), path)
    return path


def test_zero_spacing(tmp_path):
    _fails(_with_sform(tmp_path, "zero.nii.gz", np.diag([1.0, 0.0, 1.0, 1.0])), "absurd voxel spacing")


def test_huge_spacing(tmp_path):
    _fails(_with_sform(tmp_path, "wide.nii.gz", np.diag([1.0, 1.0, 1000.0, 1.0])), "absurd voxel spacing")


def test_complex_dtype(make_nifti):
    data = (np.random.default_rng(0).random((8, 8, 4)) + 1j).astype(np.complex64)
    _fails(make_nifti(data, "complex.nii.gz"), "unsupported data type complex64")


def test_rgb_dtype(make_nifti):
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.arange(8)[:, None, None]
    _fails(make_nifti(rgb, "rgb.nii.gz"), "unsupported data type")


# ---- never overwrite inputs ---------------------------------------------------------------------


def test_never_overwrites_input(make_nifti, tmp_path):
    src = make_nifti(name="input.nii.gz")
    before, mtime = src.read_bytes(), src.stat().st_mtime_ns
    vol = load_scan(src)
    for target in (src, tmp_path / "." / "input.nii.gz"):
        with pytest.raises(ScanError, match=r"input\.nii\.gz: refusing to overwrite the input"):
            save_like(vol.data, vol, target, overwrite=True)
    link = tmp_path / "link.nii.gz"
    os.symlink(src, link)
    with pytest.raises(ScanError, match="refusing to overwrite"):
        save_like(vol.data, vol, link, overwrite=True)
    assert src.read_bytes() == before and src.stat().st_mtime_ns == mtime


def test_existing_output_needs_overwrite(make_nifti, tmp_path):
    vol = load_scan(make_nifti())
    out = save_like(vol.data, vol, tmp_path / "deep" / "er" / "out.nii.gz")
    assert out.exists()
    with pytest.raises(ScanError, match=r"out\.nii\.gz: already exists"):
        save_like(vol.data + 1, vol, out)
    np.testing.assert_array_equal(nib.load(out).get_fdata(), vol.data)
    save_like(vol.data + 1, vol, out, overwrite=True)
    np.testing.assert_array_equal(nib.load(out).get_fdata(), vol.data + 1)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.nii.gz"]  # no temp files left


def test_save_rejects_bad_name_and_shape(make_nifti, tmp_path):
    vol = load_scan(make_nifti())
    with pytest.raises(ScanError, match=r"\.nii or \.nii\.gz"):
        save_like(vol.data, vol, tmp_path / "out.png")
    with pytest.raises(ScanError, match="does not match"):
        save_like(vol.data[:-1], vol, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_load_does_not_warn_on_clean_scan(make_nifti):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_scan(make_nifti())


# ---- reading .nii.gz through one checked stream ------------------------------------------------


@pytest.mark.parametrize("kind", ["scaled int16", "nifti2", "extension"])
def test_checked_gzip_read_equals_nibabel(tmp_path, kind):
    """The CRC-checked stream reads exactly what nibabel reads (scaling, NIfTI-2, extensions)."""
    data = phantom((20, 18, 6)) * 1000
    path = tmp_path / f"{kind.replace(' ', '_')}.nii.gz"
    if kind == "nifti2":
        img = nib.Nifti2Image(data, np.diag([0.9, 1.1, 2.0, 1.0]))
    else:
        img = nib.Nifti1Image(data, np.diag([-0.9, 1.1, 2.0, 1.0]))
    if kind == "scaled int16":
        img.set_data_dtype(np.int16)  # nibabel stores slope/intercept
    if kind == "extension":
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"made by a test" * 10))
    nib.save(img, path)
    expected = nib.load(path)
    assert kind != "scaled int16" or expected.dataobj.slope != 1.0
    vol = load_scan(path)
    canon = nib.as_closest_canonical(expected)
    np.testing.assert_array_equal(vol.data, canon.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(vol.affine, canon.affine)


def test_empty_and_temporary_files_are_named_as_such(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _fails(tmp_path / "empty.nii.gz", "empty file")
    path = write_nifti(tmp_path / ".scan.nii.gz.ab12cd34.tmp.nii.gz", phantom())
    _fails(path, "temporary file of an unfinished write")


def test_load_map(make_nifti, tmp_path):
    from pseudohealthy.data.io import load_map

    like = load_scan(make_nifti())
    good = write_nifti(tmp_path / "a_anomaly.nii.gz", np.full(like.data.shape, 0.25, np.float32))
    np.testing.assert_array_equal(load_map(good, like), 0.25)
    flat = write_nifti(tmp_path / "flat_anomaly.nii.gz", np.zeros((32, 32), np.float32))
    with pytest.raises(ScanError, match="anomaly map must be 3D"):
        load_map(flat, like)
    bad = np.zeros(like.data.shape, np.float32)
    bad[1, 1, 1] = np.nan
    with pytest.raises(ScanError, match="contains NaN or Inf"):
        load_map(write_nifti(tmp_path / "nan_anomaly.nii.gz", bad), like)
    with pytest.raises(ScanError, match="does not match"):
        load_map(write_nifti(tmp_path / "small_anomaly.nii.gz", bad[:-1]), like)


def test_nonfinite_rules(make_nifti):
    data = phantom()
    data[np.random.default_rng(0).random(data.shape) < 0.6] = np.nan
    _fails(make_nifti(data, "scattered.nii.gz"), "mostly non-finite")
    nan_background = phantom(background=np.nan)  # > 50% NaN, all of them outside the brain
    with pytest.warns(ScanWarning, match="NaN/Inf"):
        vol = load_scan(make_nifti(nan_background, "nanbg.nii.gz"))
    assert np.isfinite(vol.data).all()
    inf_brain = phantom()
    inf_brain[inf_brain > 0] = np.inf
    _fails(make_nifti(inf_brain, "infbrain.nii.gz"), "nothing left after replacing")
