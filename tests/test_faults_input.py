"""Fault injection for input scans (issue 12): every bad input is made on the fly, small, and run
through the library (``load_scan`` + ``prepare_scan``) and through ``pseudohealthy restore``.

A bad input must give a :class:`ScanError` of one line that names the file and the problem, and
the command must exit non-zero with that one line on stderr and leave no output file. Inputs that
are repaired or only warned about (a few NaN voxels, a NaN background, intensities near the
float32 limit, an outlier voxel) must restore with finite outputs.
"""

from __future__ import annotations

import builtins
import errno
import gzip
import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import phantom, write_nifti
from pseudohealthy.cli import main
from pseudohealthy.data.dataset import find_scans
from pseudohealthy.data.io import load_map, load_mask, load_scan
from pseudohealthy.data.preprocess import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, prepare_scan
from pseudohealthy.engine.reference import random_ensemble
from pseudohealthy.errors import ScanError, ScanWarning

SIZE = 32  # the tiny preset's image size

Maker = Callable[[Path, pytest.MonkeyPatch], Path]


# ---- bad files ----------------------------------------------------------------------------------


def _scan(tmp: Path, data: np.ndarray | None = None, name: str = "scan.nii.gz", **kw) -> Path:
    return write_nifti(tmp / name, phantom() if data is None else data, **kw)


def bad_crc(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    """Valid deflate of garbage voxels, with the gzip trailer (CRC-32, length) of the good file."""
    good = _scan(tmp, name="good.nii.gz").read_bytes()
    raw = bytearray(gzip.decompress(good))
    rng = np.random.default_rng(0)
    for i in rng.integers(352, len(raw), 2000):
        raw[i] = int(rng.integers(0, 256))
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(bytes(raw)) + deflate.flush()
    path = tmp / "badcrc.nii.gz"
    path.write_bytes(good[:10] + body + good[-8:])
    return path


def bad_length(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    """The right CRC-32 but a wrong length in the gzip trailer."""
    good = _scan(tmp, name="good.nii.gz").read_bytes()
    size = struct.unpack("<I", good[-4:])[0]
    path = tmp / "badlength.nii.gz"
    path.write_bytes(good[:-4] + struct.pack("<I", size + 1))
    return path


def trailing_garbage(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    path = _scan(tmp, name="tail.nii.gz")
    path.write_bytes(path.read_bytes() + b"garbage after the gzip trailer")
    return path


def truncated_gz(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    path = _scan(tmp, name="truncated.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_nii(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    path = _scan(tmp, name="truncated.nii")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    return path


def empty_gz(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    path = tmp / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def text_as_gz(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    path = tmp / "notes.nii.gz"
    path.write_text("not an image at all\n" * 50)
    return path


def gzipped_png(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    path = tmp / "photo.nii.gz"
    path.write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(600)))
    return path


def png_name(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    path = tmp / "photo.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(400))
    return path


def two_d(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    return _scan(tmp, np.random.default_rng(0).random((16, 16)).astype(np.float32), "flat.nii.gz")


def four_d(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    return _scan(tmp, np.random.default_rng(0).random((8, 8, 4, 3)).astype(np.float32), "series.nii.gz")


def constant(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    return _scan(tmp, np.full((8, 8, 4), 7.0, np.float32), "const.nii.gz")


def absurd_dims(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    """A header that claims 1 GiB of voxels, with almost none stored."""
    header = nib.Nifti1Header()
    header.set_data_shape((1024, 1024, 1024))
    header.set_data_dtype(np.uint8)
    buf = io.BytesIO()
    header.write_to(buf)
    path = tmp / "huge.nii.gz"
    path.write_bytes(gzip.compress(buf.getvalue() + bytes(104)))
    return path


def absurd_spacing(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    return _scan(tmp, name="wide.nii.gz", affine=np.diag([1.0, 1.0, 1000.0, 1.0]))


def nan_affine(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    header = nib.Nifti1Header()
    affine = np.eye(4)
    affine[0, 3] = np.nan
    header.set_sform(affine, code=2)
    header.set_qform(np.eye(4), code=0)
    path = tmp / "nanaffine.nii.gz"
    nib.save(nib.Nifti1Image(phantom(), None, header), path)
    return path


def all_nan(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    return _scan(tmp, np.full((8, 8, 4), np.nan, np.float32), "allnan.nii.gz")


def mostly_nan(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    """70% of the voxels NaN or Inf, scattered (not a NaN background)."""
    data = phantom()
    rng = np.random.default_rng(1)
    data[rng.random(data.shape) < 0.6] = np.nan
    data[rng.random(data.shape) < 0.25] = np.inf
    return _scan(tmp, data, "mostlynan.nii.gz")


def nothing_left(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    """Inf in the brain, 0 elsewhere: the repair (finite minimum) leaves a constant image."""
    data = phantom()
    data[data > 0] = np.inf
    return _scan(tmp, data, "infbrain.nii.gz")


def beyond_float32(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    data = phantom().astype(np.float64) * 1e300
    return _scan(tmp, data, "wide64.nii.gz", dtype=np.float64)


def outlier_1e30(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    data = phantom()
    data[16, 16, 6] = 1e30
    return _scan(tmp, data, "spike.nii.gz")


def temporary_name(tmp: Path, _mp: pytest.MonkeyPatch) -> Path:
    """A complete scan under the temporary name of an unfinished write, given by name."""
    return _scan(tmp, name=".scan.nii.gz.k3j2h1g0.tmp.nii.gz")


def deny_reading(path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``chmod 000``; where that does not deny reading (root), ``open`` of the file raises EACCES."""
    path.chmod(0)
    if os.access(path, os.R_OK):
        real_open, target = builtins.open, os.path.abspath(path)

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, str | os.PathLike) and os.path.abspath(os.fspath(file)) == target:
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(io, "open", guarded_open)
    return path


def unreadable_gz(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    return deny_reading(_scan(tmp, name="locked.nii.gz"), mp)


def unreadable_nii(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    return deny_reading(_scan(tmp, name="locked.nii"), mp)


BAD_INPUTS: list[tuple[str, Maker, str]] = [
    # row 2: valid deflate, garbage voxels (and the other gzip trailer checks)
    ("bad gzip CRC", bad_crc, "corrupt: gzip CRC check failed"),
    ("bad gzip length", bad_length, "corrupt: gzip length check failed"),
    ("bytes after the gzip data", trailing_garbage, "unexpected bytes after the end of the gzip data"),
    # row 4: unreadable
    ("permission denied .nii.gz", unreadable_gz, "permission denied"),
    ("permission denied .nii", unreadable_nii, "permission denied"),
    # row 10: an outlier that hides the foreground
    ("1e30 voxel", outlier_1e30, "maximum 1e+30 lies"),
    # row 13: a temporary name given explicitly
    ("temporary name", temporary_name, "temporary file of an unfinished write"),
    # item 4: non-finite input
    ("all NaN", all_nan, "no finite voxel"),
    ("mostly NaN/Inf", mostly_nan, "mostly non-finite"),
    ("nothing left after the repair", nothing_left, "nothing left after replacing"),
    ("float64 beyond float32", beyond_float32, "beyond the float32 range"),
    # what already held
    ("truncated gzip", truncated_gz, "truncated"),
    ("truncated .nii", truncated_nii, "truncated"),
    ("empty .nii.gz", empty_gz, "empty file"),
    ("text named .nii.gz", text_as_gz, "not gzip-compressed"),
    ("gzipped PNG named .nii.gz", gzipped_png, "not a NIfTI file"),
    ("PNG name", png_name, "not a NIfTI file"),
    ("2D", two_d, "is 2D"),
    ("4D, 3 volumes", four_d, "4D with 3 volumes"),
    ("constant", constant, "same value"),
    ("absurd dimensions", absurd_dims, "absurd size"),
    ("absurd spacing", absurd_spacing, "absurd voxel spacing"),
    ("NaN in the affine", nan_affine, "affine contains NaN"),
]
CASES = [pytest.param(make, fragment, id=name) for name, make, fragment in BAD_INPUTS]


# ---- running them -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_ensemble(tmp_path_factory.mktemp("ensemble"), "tiny", 1)


def _restore(scan: Path, ensemble: Path, out: Path, *extra: str) -> int:
    argv = ["-q", "restore", str(scan), "--ensemble", str(ensemble), "-o", str(out)]
    return main([*argv, "--sampler", "ddim", "--steps", "1", "--device", "cpu", "--no-preview", *extra])


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _load_and_prepare(path: Path):
    return prepare_scan(load_scan(path), size=SIZE)


@pytest.mark.parametrize(("make", "fragment"), CASES)
def test_bad_input_is_one_line_scan_error(tmp_path, monkeypatch, make, fragment):
    path = make(tmp_path, monkeypatch)
    with pytest.raises(ScanError) as info:
        _load_and_prepare(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert info.value.path == path


@pytest.mark.parametrize(("make", "fragment"), CASES)
def test_bad_input_fails_restore_in_one_line(tmp_path, monkeypatch, capsys, ensemble, make, fragment):
    path = make(tmp_path, monkeypatch)
    out = tmp_path / "out"
    capsys.readouterr()
    assert _restore(path, ensemble, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"pseudohealthy restore: error: {path}: ")
    assert fragment in err[0]
    assert _files(out) == []


def test_truncated_and_corrupt_never_said_of_unreadable_files(tmp_path, monkeypatch):
    for make in (unreadable_gz, unreadable_nii):
        with pytest.raises(ScanError, match="permission denied") as info:
            load_scan(make(tmp_path, monkeypatch))
        assert "truncated" not in info.value.problem and "corrupt" not in info.value.problem


@pytest.mark.parametrize("make", [unreadable_gz, bad_crc], ids=["permission denied", "bad CRC"])
def test_masks_and_maps_are_read_like_scans(tmp_path, monkeypatch, make):
    like = load_scan(_scan(tmp_path, name="like.nii.gz"))
    path = make(tmp_path, monkeypatch)
    fragment = "permission denied" if make is unreadable_gz else "gzip CRC check failed"
    for read in (load_mask, load_map):
        with pytest.raises(ScanError, match=fragment) as info:
            read(path, like)
        assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_bad_crc_is_refused_where_nibabel_reads_garbage(tmp_path, monkeypatch):
    path = bad_crc(tmp_path, monkeypatch)
    garbage = nib.load(path).get_fdata()  # nibabel stops before the trailer: no CRC check
    assert not np.array_equal(garbage, phantom())
    with pytest.raises(ScanError, match="gzip CRC check failed"):
        load_scan(path)


# ---- repaired or warned: restored, finite ---------------------------------------------------------


def _restored_finite(scan: Path, ensemble: Path, out: Path) -> dict:
    assert _restore(scan, ensemble, out) == 0
    name = scan.name.removesuffix(".nii.gz")
    for suffix in ("_anomaly", "_pseudohealthy"):
        data = nib.load(out / f"{name}{suffix}.nii.gz").get_fdata()
        assert np.isfinite(data).all(), suffix
    record = json.loads((out / f"{name}_restore.json").read_text())
    assert np.isfinite(record["volume_score"])
    return record


def test_near_float32_limit_normalises_finite(tmp_path, ensemble):
    """Row 3: a finite float32 scan spanning -3e38..3e38."""
    ph = phantom().astype(np.float64)
    data = (ph / ph.max() * 6e38 - 3e38).astype(np.float32)
    path = _scan(tmp_path, data, "huge.nii.gz")
    prep = _load_and_prepare(path)
    assert np.isfinite(prep.images).all() and prep.images.max() == 1.0
    back = prep.denormalise(prep.normalised)
    assert np.isfinite(back).all()
    np.testing.assert_allclose(back[prep.foreground], data[prep.foreground], rtol=1e-5, atol=1e34)
    _restored_finite(path, ensemble, tmp_path / "out")


def test_outlier_voxel_warns_and_suggests_percentile(tmp_path, ensemble):
    """Row 10: one voxel of 100 where the scan's maximum is 4.5."""
    data = phantom() * np.float32(4.5 / phantom().max())
    data[16, 16, 6] = 100.0
    path = _scan(tmp_path, data, "outlier.nii.gz")
    with pytest.warns(ScanWarning, match=r"outlier\.nii\.gz: the maximum 100 .*norm='percentile'") as rec:
        _load_and_prepare(path)
    assert len(rec) == 1 and "\n" not in str(rec[0].message)
    with pytest.warns(ScanWarning, match="outlier voxel"):
        _restored_finite(path, ensemble, tmp_path / "out")


def test_no_outlier_warning_for_clean_or_percentile(tmp_path, recwarn):
    data = phantom() * np.float32(4.5 / phantom().max())
    prepare_scan(load_scan(_scan(tmp_path, data, "clean.nii.gz")), size=SIZE)
    data[16, 16, 6] = 100.0
    prepare_scan(load_scan(_scan(tmp_path, data, "spiky.nii.gz")), size=SIZE, norm="percentile")
    assert not [w for w in recwarn if issubclass(w.category, ScanWarning)]


def test_few_nan_voxels_are_repaired(tmp_path, ensemble):
    data = phantom()
    data[16, 16, 6], data[3, 3, 3], data[10, 20, 5] = np.nan, np.inf, -np.inf
    path = _scan(tmp_path, data, "fewnan.nii.gz")
    with pytest.warns(ScanWarning, match="replaced 3 NaN/Inf"):
        _restored_finite(path, ensemble, tmp_path / "out")


def test_nan_background_is_repaired_not_refused(tmp_path):
    """NaN outside the brain (SPM's convention) is most of the volume but not corrupt."""
    data = phantom(background=np.nan)
    assert np.isnan(data).mean() > 0.5
    with pytest.warns(ScanWarning, match="NaN/Inf"):
        prep = _load_and_prepare(_scan(tmp_path, data, "nanbg.nii.gz"))
    assert np.isfinite(prep.images).all() and len(prep.indices) > 0


# ---- row 13: temporary names in folders ---------------------------------------------------------


def test_folder_skips_temporary_names(tmp_path, ensemble):
    folder = tmp_path / "scans"
    _scan(folder, name="scan.nii.gz")
    partial = _scan(folder, name=".scan.nii.gz.a1b2c3d4.tmp.nii.gz")  # a killed write
    partial.write_bytes(partial.read_bytes()[:200])
    assert find_scans([folder]) == [(folder / "scan.nii.gz").resolve()]
    out = tmp_path / "out"
    assert _restore(folder, ensemble, out) == 0
    assert sorted(p.name for p in _files(out)) == [
        "scan_anomaly.nii.gz",
        "scan_pseudohealthy.nii.gz",
        "scan_restore.json",
        "scan_uncertainty.nii.gz",
    ]


# ---- row 14: --size out of range ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["synth", "evaluate"])
@pytest.mark.parametrize("size", ["100000", "8"])
def test_size_out_of_range_is_refused_first(tmp_path, capsys, command, size):
    scan = _scan(tmp_path)
    out = tmp_path / "out"
    if command == "synth":
        argv = ["-q", "synth", str(scan), "--task", "sink", "-o", str(out), "--size", size]
    else:
        rest = tmp_path / "maps"
        rest.mkdir()
        argv = ["-q", "evaluate", "--scans", str(scan), "--masks", str(scan), "--restorations", str(rest)]
        argv += ["-o", str(out), "--size", size]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    allowed = f"from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels, got {size}"
    assert err[0] == f"pseudohealthy {command}: error: --size must be an image size {allowed}"
    assert _files(out) == []


# ---- as a user runs it: one process, many inputs ------------------------------------------------


def test_command_line_reports_each_bad_scan_in_one_line_and_goes_on(tmp_path, monkeypatch, ensemble):
    """``python -m pseudohealthy restore`` over every bad input and a good scan, in a subprocess:
    one line per bad file (no traceback, no Python warning), the good one restored, exit 2."""
    import subprocess
    import sys

    readable = [(n, m, f) for n, m, f in BAD_INPUTS if m not in (unreadable_gz, unreadable_nii)]
    folders = [tmp_path / f"case{i}" for i in range(len(readable))]
    for folder in folders:
        folder.mkdir()
    bad = [make(folder, monkeypatch) for folder, (_, make, _) in zip(folders, readable, strict=True)]
    if os.geteuid() != 0:  # chmod 000 denies reading only where we are not root
        bad.append(deny_reading(_scan(tmp_path / "locked", name="locked.nii.gz"), monkeypatch))
    good = _scan(tmp_path / "good", name="good.nii.gz")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pseudohealthy", "-q", "restore", *map(str, bad), str(good)]
    argv += ["--ensemble", str(ensemble), "-o", str(out), "--sampler", "ddim", "--steps", "1"]
    argv += ["--device", "cpu", "--no-preview"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    run = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, check=False)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and "Warning" not in run.stderr, run.stderr
    assert len(lines) == len(bad) + 1, lines  # one per bad file, then the count
    for path, line in zip(bad, lines, strict=False):
        assert line.startswith(f"pseudohealthy restore: error: {path}: "), line
    for (_, _, fragment), line in zip(readable, lines, strict=False):
        assert fragment in line, line
    assert lines[-1] == f"pseudohealthy restore: {len(bad)} of {len(bad) + 1} scans failed"
    assert sorted(p.name for p in _files(out)) == [
        "good_anomaly.nii.gz",
        "good_pseudohealthy.nii.gz",
        "good_restore.json",
        "good_uncertainty.nii.gz",
    ]


def test_the_command_line_prints_a_warning_on_one_line(tmp_path):
    """Row 10 through a real process: the outlier warning is one line naming the file."""
    import subprocess
    import sys

    data = phantom() * np.float32(4.5 / phantom().max())
    data[16, 16, 6] = 100.0
    path = _scan(tmp_path, data, "outlier.nii.gz")
    proc = subprocess.run(
        [sys.executable, "-m", "pseudohealthy", "synth", str(path), "--task", "intensity", "-o",
         str(tmp_path / "synth"), "--size", "32"],
        capture_output=True, encoding="utf-8", timeout=300,
    )  # fmt: skip
    warned = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert proc.returncode == 0, proc.stderr
    assert len(warned) == 1 and warned[0].startswith("pseudohealthy synth: warning: ")
    assert "outlier.nii.gz: the maximum 100" in warned[0]
