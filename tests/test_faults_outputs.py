"""Faults against what the commands write: a full disk (a tiny tmpfs, and writers patched to fail
midway), a kill during a write, output folders that cannot be used, saved maps that would be
replaced, inputs that share a name and runs over many scans with some bad ones.

Every check here can fail: each fault is shown to have happened (a temporary file written and
cut, a non-zero exit, a count) before what it left behind is inspected.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import phantom, write_nifti
from pseudohealthy.cli import main
from pseudohealthy.cli.batch import Batch, check_output_dir, distinct_names
from pseudohealthy.cli.restore import collect_scans
from pseudohealthy.data.files import is_temporary_name
from pseudohealthy.data.io import scan_name
from pseudohealthy.engine.reference import random_ensemble
from pseudohealthy.errors import PseudohealthyError

FAST = ["--sampler", "ddim", "--steps", "1", "--device", "cpu"]
ENOSPC = os.strerror(errno.ENOSPC)  # "No space left on device"
SRC = Path(__file__).resolve().parents[1] / "src" / "pseudohealthy"

pytestmark = pytest.mark.filterwarnings("ignore::pseudohealthy.errors.ScanWarning")


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Path:
    return random_ensemble(tmp_path_factory.mktemp("ens"), "tiny", 1)


def _scan(path: Path, seed: int = 0, shape=(32, 32, 8)) -> Path:
    return write_nifti(path, phantom(shape, seed=seed))


def _case(root: Path, seed: int) -> tuple[Path, Path]:
    """A phantom scan with a bright lesion and its mask: ``root/FLAIR.nii.gz``, ``root/lesion.nii.gz``."""
    shape = (32, 32, 8)
    image = phantom(shape, seed=seed)
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    lesion = ((grids[0] - 13 - seed) / 5) ** 2 + ((grids[1] - 17) / 5) ** 2 + ((grids[2] - 4) / 2) ** 2 < 1
    image[lesion] += 0.3
    mask = write_nifti(root / "lesion.nii.gz", lesion.astype(np.uint8))
    return write_nifti(root / "FLAIR.nii.gz", image), mask


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temporary_name(p)] if folder.exists() else []


def _assert_whole(folder: Path) -> list[str]:
    """Every file under a final name in ``folder`` reads back completely; returns their names."""
    from PIL import Image

    names = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not is_temporary_name(p)):
        names.append(str(path.relative_to(folder)))
        if path.name.endswith((".nii", ".nii.gz")):
            assert np.isfinite(nib.load(path).get_fdata()).all(), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as png:
                png.load()
        else:
            raise AssertionError(f"unexpected output {path}")
    return names


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


# --- the inputs of each command, and the groups of outputs that must appear whole or not at all --


def _restore(tmp: Path, ensemble: Path) -> tuple[list[str], Path, list[list[str]]]:
    a, b = _scan(tmp / "in" / "a.nii.gz"), _scan(tmp / "in" / "b.nii.gz", seed=1)
    out = tmp / "out"
    argv = ["restore", str(a), str(b), "--ensemble", str(ensemble), "-o", str(out), "--member-maps", *FAST]
    suffixes = ("pseudohealthy.nii.gz", "anomaly.nii.gz", "uncertainty.nii.gz", "anomaly_fold0.nii.gz")
    suffixes += ("preview.png", "restore.json")
    units = [[f"{n}_{s}" for s in suffixes] for n in ("a", "b")]
    return argv, out, units


def _evaluate(tmp: Path, ensemble: Path) -> tuple[list[str], Path, list[list[str]]]:
    (s1, m1), (s2, m2) = _case(tmp / "in" / "p1", 0), _case(tmp / "in" / "p2", 1)
    out = tmp / "out"
    argv = ["evaluate", "--scans", str(s1), str(s2), "--masks", str(m1), str(m2)]
    argv += ["--ensemble", str(ensemble), "--frame", "native", "--size", "32", "-o", str(out), *FAST]
    units = [["metrics.json", "pr_curve.png", "roc_curve.png"]]
    units += [[f"anomaly_maps/{n}_FLAIR_anomaly.nii.gz"] for n in ("p1", "p2")]
    return argv, out, units


def _synth(tmp: Path, ensemble: Path) -> tuple[list[str], Path, list[list[str]]]:
    scan = _scan(tmp / "in" / "s.nii.gz")
    out = tmp / "out"
    argv = ["synth", str(scan), "--task", "sink,intensity", "--size", "32", "--slices", "2", "-o", str(out)]
    images = [f"s_{t}_{k}.nii.gz" for t in ("sink", "intensity") for k in ("corrupted", "mask")]
    units = [[*images, "s_gallery.png"]]
    return argv, out, units


def _preprocess(tmp: Path, ensemble: Path) -> tuple[list[str], Path, list[list[str]]]:
    a, b = (_scan(tmp / "in" / f"{n}.nii.gz", seed=i, shape=(40, 40, 30)) for i, n in enumerate("ab"))
    out = tmp / "out"
    argv = ["preprocess", str(a), str(b), "-o", str(out), "--no-skull-strip", "--space", "native"]
    suffixes = ("preprocessed.nii.gz", "brainmask.nii.gz", "transform.json")
    units = [[f"{n}_{s}" for s in suffixes] for n in "ab"]
    return argv, out, units


COMMANDS: dict[str, Callable[[Path, Path], tuple[list[str], Path, list[list[str]]]]] = {
    "restore": _restore,
    "evaluate": _evaluate,
    "synth": _synth,
    "preprocess": _preprocess,
}


def _assert_units(out: Path, units: list[list[str]]) -> list[str]:
    """Each group of outputs is there whole or not at all; no temporary file is left. Returns
    the names present."""
    assert not _temporaries(out), _temporaries(out)
    present = set(_assert_whole(out)) if out.exists() else set()
    for unit in units:
        there = present & set(unit)
        assert not there or there == set(unit), f"a half set of outputs: {sorted(there)} of {unit}"
    assert present <= {name for unit in units for name in unit}, present
    return sorted(present)


# --- (a) a full disk: writers patched to write half and fail, and a real tiny tmpfs ------------

WRITERS = {  # kind -> (object, attribute, index of the destination among the arguments)
    "nifti": ("nibabel", "save", 1),
    "png": ("matplotlib.figure.Figure", "savefig", 1),
    "text": ("pathlib.Path", "write_text", 0),
}


def _resolve(dotted: str):
    import importlib

    module, _, attr = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ImportError:
        return getattr(importlib.import_module(module), attr)


def _fail_midway(monkeypatch, kind: str, nth: int) -> list[Path]:
    """Make the ``nth`` call of a writer write its file, cut it in half and raise ENOSPC, as a disk
    that fills up during the write; returns the paths it cut (one, once it happened)."""
    owner_name, attr, where = WRITERS[kind]
    owner = _resolve(owner_name)
    real = getattr(owner, attr)
    calls: list[int] = []
    cut: list[Path] = []

    def writer(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        if len(calls) == nth:
            path = Path(args[where] if where else args[0])
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
            cut.append(path)
            raise OSError(errno.ENOSPC, ENOSPC)
        return result

    monkeypatch.setattr(owner, attr, writer)
    return cut


FULL_DISK = [
    ("restore", "nifti", 1),  # the pseudo-healthy image of the first scan
    ("restore", "nifti", 2),  # its anomaly map (the image is complete by then)
    ("restore", "nifti", 3),  # its member map
    ("restore", "png", 1),  # its preview
    ("restore", "text", 1),  # its restore.json, the last of its outputs
    ("restore", "nifti", 5),  # the second scan's first output: the first scan stays whole
    ("evaluate", "nifti", 1),  # the first saved anomaly map
    ("evaluate", "png", 1),  # the PR curve
    ("evaluate", "png", 2),  # the ROC curve
    ("evaluate", "text", 1),  # metrics.json
    ("synth", "nifti", 1),
    ("synth", "nifti", 4),  # the second task's mask
    ("synth", "png", 1),  # the gallery
    ("preprocess", "nifti", 1),
    ("preprocess", "nifti", 2),  # the brain mask
    ("preprocess", "text", 1),  # the transform JSON
    ("preprocess", "nifti", 4),  # the second scan's brain mask
]


@pytest.mark.parametrize(("command", "kind", "nth"), FULL_DISK, ids=[f"{c}-{k}{n}" for c, k, n in FULL_DISK])
def test_a_write_that_fails_midway_leaves_no_broken_file(
    command, kind, nth, ensemble, tmp_path, monkeypatch, capsys
) -> None:
    argv, out, units = COMMANDS[command](tmp_path, ensemble)
    cut = _fail_midway(monkeypatch, kind, nth)
    rc = main(["-q", *argv])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert cut, "the fault never happened"
    assert is_temporary_name(cut[0]), f"{cut[0]} was written under its final name, not a temporary one"
    assert rc == 2
    (line,) = _error_lines(err)
    assert f"cannot write {out}" in line and line.endswith(ENOSPC) and ".tmp" not in line, line
    assert not cut[0].exists()
    present = _assert_units(out, units)
    assert len(present) < sum(len(u) for u in units)  # something is missing: the failed unit
    if (command, nth) in (("restore", 5), ("preprocess", 4)):  # the first scan was complete
        assert set(units[0]) <= set(present) and "1 of 2 scans failed" in err


def _mount_tmpfs(folder: Path, options: str) -> None:
    """Mount a tmpfs on ``folder`` (root and a kernel that lets us), or skip the test."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@contextmanager
def _tmpfs(folder: Path, options: str) -> Iterator[Path]:
    _mount_tmpfs(folder, options)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


TMPFS_KB = {  # sizes that fill up at different outputs (see the comments), and one that holds all
    "restore": (4, 16, 40, 64, 100, 400),  # image, member map, preview, JSON, the second scan; all
    "evaluate": (4, 8, 40, 60, 80, 400),  # 1st map, 2nd map, PR, ROC, metrics.json; all
    "synth": (4, 8, 24, 400),  # 1st image, its mask, the gallery; all
    "preprocess": (4, 48, 64, 400),  # 1st image, its transform, the second scan; all
}


@pytest.mark.parametrize("command", list(TMPFS_KB))
def test_a_real_full_disk_leaves_no_broken_file(command, ensemble, tmp_path, capsys) -> None:
    argv, _, units = COMMANDS[command](tmp_path / "inputs", ensemble)
    outcomes, failed_at = [], set()
    for size in TMPFS_KB[command]:
        mount = tmp_path / f"disk{size}"
        with _tmpfs(mount, f"size={size}k") as out:
            run = [str(mount) if a == str(tmp_path / "inputs" / "out") else a for a in argv]
            rc = main(["-q", *run])
            err = capsys.readouterr().err
            if rc:
                (line,) = _error_lines(err)
                assert f"cannot write {out}" in line and line.endswith(ENOSPC), line
                failed_at.add(line.split("cannot write ", 1)[1].rsplit(":", 1)[0])
            present = _assert_units(out, units)
            outcomes.append((size, rc, len(present)))
    assert outcomes[0][1] == 2 and outcomes[-1][1] == 0, outcomes  # it did fill up, and then it fit
    assert outcomes[-1][2] == sum(len(u) for u in units)
    assert len(failed_at) >= 3, failed_at  # the disk filled up at different outputs


# --- (b) a kill during a write ------------------------------------------------------------------

KILL_SCRIPT = r"""
import pathlib, sys, time
kind, nth = sys.argv[1], int(sys.argv[2])
calls = []

def stall(path, write):
    write()
    calls.append(1)
    if len(calls) == nth:
        path = pathlib.Path(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # half of it on disk when the kill comes
        print("WRITING", path, flush=True)
        time.sleep(600)

if kind == "nifti":
    import nibabel
    real_save = nibabel.save
    nibabel.save = lambda img, name, **kw: stall(name, lambda: real_save(img, name, **kw))
elif kind == "png":
    from matplotlib.figure import Figure
    real_fig = Figure.savefig
    Figure.savefig = lambda self, name, **kw: stall(name, lambda: real_fig(self, name, **kw))
else:
    real_text = pathlib.Path.write_text
    pathlib.Path.write_text = lambda self, text, **kw: stall(self, lambda: real_text(self, text, **kw))

from pseudohealthy.cli import main
sys.exit(main(sys.argv[3:]))
"""

KILLS = [("nifti", 2), ("png", 1), ("text", 1)]


@pytest.mark.parametrize(("kind", "nth"), KILLS, ids=[f"{k}{n}" for k, n in KILLS])
def test_a_kill_during_a_write_leaves_no_truncated_file_and_no_scan(kind, nth, ensemble, tmp_path) -> None:
    folder = tmp_path / "scans"  # inputs and outputs in one folder, as people do
    _scan(folder / "scan.nii.gz")
    argv = ["-q", "restore", str(folder), "--ensemble", str(ensemble), "-o", str(folder), *FAST]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, kind, str(nth), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("WRITING "), f"no write to stall at: {line!r} {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    half = Path(line.split(" ", 1)[1].strip())
    assert half.exists() and is_temporary_name(half) and half.parent == folder  # killed mid-write
    # nothing under a final name is truncated; the file being written is not there at all
    names = _assert_whole(folder)
    final = half.name[1:].split(".tmp")[0]  # .<name>.<hex>.tmp<suffix> -> <name>.<hex>
    assert not any(final.startswith(n + ".") for n in names)
    assert "scan_restore.json" not in names  # written last: the run did not finish
    # a later restore of that folder takes only the scan, never the leftover for one
    assert collect_scans([folder]) == [folder / "scan.nii.gz"]
    assert main([*argv, "--overwrite"]) == 0
    outputs = {p.name for p in folder.iterdir() if not is_temporary_name(p)}
    assert outputs == {
        "scan.nii.gz",
        "scan_pseudohealthy.nii.gz",
        "scan_anomaly.nii.gz",
        "scan_uncertainty.nii.gz",
        "scan_preview.png",
        "scan_restore.json",
    }
    _assert_whole(folder)
    record = json.loads((folder / "scan_restore.json").read_text())
    assert record["scan"] == str(folder / "scan.nii.gz")
    # and the leftover given by name is refused, not restored
    other = tmp_path / "other"
    assert main(["-q", "restore", str(half), "--ensemble", str(ensemble), "-o", str(other), *FAST]) == 2
    assert not other.exists() or not any(other.iterdir())


# --- (c) row 7: output folders that cannot be used, refused before anything is computed --------


def _boom(*args, **kwargs):
    raise AssertionError("computing started although the output folder is unusable")


def _forbid_computing(monkeypatch) -> None:
    for target in (
        "pseudohealthy.engine.restore.restore_volume",
        "pseudohealthy.evaluation.cases.restore_anomaly",
        "pseudohealthy.evaluation.cases.load_scan",
        "pseudohealthy.data.anomalies.scan.corrupt_scan",
        "pseudohealthy.data.registration.preprocess_scan",
        "pseudohealthy.data.registration.load_template",
        "pseudohealthy.model.checkpoint.Ensemble.from_dir",
    ):
        monkeypatch.setattr(target, _boom)


@pytest.fixture
def read_only(tmp_path) -> Iterator[Path]:
    """A folder this process cannot write into (a read-only tmpfs as root, else mode 0o555)."""
    folder = tmp_path / "ro"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with _tmpfs(folder, "ro,size=64k"):
        yield folder


BAD_OUTPUTS = {  # name -> (the -o path, from tmp_path and the read-only folder; words expected)
    "an existing file": (lambda tmp, ro: tmp / "taken.txt", "exists and is not a folder"),
    "a folder under a file": (lambda tmp, ro: tmp / "taken.txt" / "out", "is a file"),
    "a read-only folder": (lambda tmp, ro: ro, "cannot write into the folder"),
    "a folder in a read-only folder": (lambda tmp, ro: ro / "out", "cannot create the folder"),
}


@pytest.mark.parametrize("bad", list(BAD_OUTPUTS))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unusable_output_folder_is_refused_before_computing(
    command, bad, ensemble, tmp_path, monkeypatch, capsys, request
) -> None:
    argv, out, _ = COMMANDS[command](tmp_path, ensemble)
    (tmp_path / "taken.txt").write_text("not a folder")
    ro = request.getfixturevalue("read_only") if "read-only" in bad else None
    make, words = BAD_OUTPUTS[bad]
    target = make(tmp_path, ro)
    argv = [str(target) if a == str(out) else a for a in argv]
    _forbid_computing(monkeypatch)
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"-o {target}:" in err and words in err, err
    assert (tmp_path / "taken.txt").read_text() == "not a folder"
    if ro is not None:
        assert not any(ro.iterdir()) and ("read-only" in err or "permission denied" in err)


def test_check_output_dir_accepts_new_and_existing_folders(tmp_path) -> None:
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()  # checked, not created
    assert check_output_dir(tmp_path) == tmp_path


# --- (c) row 8: evaluate never replaces a saved anomaly map without --overwrite ----------------


def _fake_restorer(monkeypatch) -> list[str]:
    """Replace the engine in evaluate by a quick map (the lesion, scaled by the call number)."""
    from pseudohealthy.data.io import load_mask

    calls: list[str] = []

    def restore(volume, ensemble, settings, slices, brain_mask):
        calls.append(volume.name)
        lesion = load_mask(volume.path.parent / "lesion.nii.gz", volume)
        return lesion.astype(np.float32) * (0.9 - 0.1 * len(calls))

    monkeypatch.setattr("pseudohealthy.evaluation.cases.restore_anomaly", restore)
    monkeypatch.setattr("pseudohealthy.model.checkpoint.Ensemble.from_dir", lambda path: "ENSEMBLE")
    return calls


SAVED_MAPS = [  # extra arguments -> exit status, restored again, saved maps replaced, words
    ([], 2, False, False, "already exists (reuse the saved maps with --restorations"),
    (["--restorations", "{maps}"], 0, False, False, None),
    (["--overwrite"], 0, True, True, None),
]


@pytest.mark.parametrize(("extra", "rc", "restored", "replaced", "words"), SAVED_MAPS)
def test_evaluate_never_replaces_a_saved_map_silently(
    extra, rc, restored, replaced, words, ensemble, tmp_path, monkeypatch, capsys
) -> None:
    argv, out, _ = _evaluate(tmp_path, ensemble)
    calls = _fake_restorer(monkeypatch)
    assert main(["-q", *argv]) == 0 and len(calls) == 2
    maps = out / "anomaly_maps"
    before = {p.name: p.read_bytes() for p in maps.iterdir()}
    assert sorted(before) == ["p1_FLAIR_anomaly.nii.gz", "p2_FLAIR_anomaly.nii.gz"]
    for name in ("metrics.json", "pr_curve.png", "roc_curve.png"):  # as if the run had stopped there
        (out / name).unlink()
    capsys.readouterr()
    assert main(["-q", *argv, *(a.format(maps=maps) for a in extra)]) == rc
    err = capsys.readouterr().err.strip()
    assert (len(calls) > 2) == restored
    after = {p.name: p.read_bytes() for p in maps.iterdir()}
    assert (after != before) == replaced and sorted(after) == sorted(before)
    if words:
        assert len(err.splitlines()) == 1 and words in err and str(maps / "p1_FLAIR_anomaly.nii.gz") in err
        assert not (out / "metrics.json").exists()
    else:
        assert (out / "metrics.json").is_file()


# --- (c) row 9: inputs that share a file name get distinct output names --------------------------


NAMES = [
    (["a/x.nii.gz", "b/x.nii.gz"], ["a_x", "b_x"]),
    (["x.nii.gz", "y.nii"], ["x", "y"]),
    (["a/x.nii.gz", "b/x.nii.gz", "c/a_x.nii.gz"], ["a_x_2", "b_x", "a_x"]),  # a unique name is kept
    (["p/a/x.nii", "q/a/x.nii.gz"], ["a_x", "a_x_2"]),
    (["a/x.nii", "a/x.nii"], ["a_x", "a_x_2"]),
]


@pytest.mark.parametrize(("paths", "names"), NAMES)
def test_distinct_names(paths, names) -> None:
    assert distinct_names(paths, scan_name) == names


@pytest.mark.parametrize("command", ["restore", "preprocess"])
def test_inputs_with_the_same_name_get_distinct_outputs(command, ensemble, tmp_path, capsys) -> None:
    argv, out, _ = COMMANDS[command](tmp_path, ensemble)
    inputs = [a for a in argv if a.endswith(".nii.gz")]
    same = []
    for folder, path in zip(("site1", "site2"), inputs, strict=True):  # both named scan.nii.gz
        target = tmp_path / folder / "scan.nii.gz"
        target.parent.mkdir()
        shutil.copy(path, target)
        same.append(str(target))
    argv = [same[inputs.index(a)] if a in inputs else a for a in argv]
    assert main(["-q", *argv]) == 0
    printed = capsys.readouterr().out
    for folder, path in zip(("site1", "site2"), same, strict=True):
        assert f"{path}: another input has the same name; its outputs are named {folder}_scan_*" in printed
    names = {p.name for p in out.iterdir()}
    record = "restore.json" if command == "restore" else "transform.json"
    for folder, path in zip(("site1", "site2"), same, strict=True):
        assert f"{folder}_scan_{record}" in names
        info = json.loads((out / f"{folder}_scan_{record}").read_text())
        assert info["scan"] == path


# --- (c) many scans: each failure one line, the rest go on, a count and exit status 2 -----------


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    text = tmp / "bad" / "text.nii.gz"
    text.parent.mkdir(parents=True, exist_ok=True)
    text.write_text("hello")
    cut = tmp / "bad" / "cut.nii.gz"
    cut.write_bytes(_scan(tmp / "bad" / "whole.nii.gz").read_bytes()[:300])
    (tmp / "bad" / "whole.nii.gz").unlink()
    return {"text": text, "cut": cut}


def test_restore_goes_on_past_bad_scans_and_counts_them(ensemble, tmp_path, capsys) -> None:
    argv, out, units = _restore(tmp_path, ensemble)
    bad = _bad_inputs(tmp_path)
    a, b = argv[1], argv[2]
    argv = ["restore", str(bad["text"]), a, str(bad["cut"]), b, str(tmp_path / "missing.nii.gz"), *argv[3:]]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 3 and "pseudohealthy restore: 3 of 5 scans failed" in err
    for path in (bad["text"], bad["cut"], tmp_path / "missing.nii.gz"):
        assert sum(str(path) in line for line in lines) == 1
    assert _assert_units(out, units) == sorted(n for u in units for n in u)


def test_preprocess_goes_on_past_bad_scans_and_counts_them(ensemble, tmp_path, capsys) -> None:
    argv, out, units = _preprocess(tmp_path, ensemble)
    bad = _bad_inputs(tmp_path)
    argv = ["preprocess", argv[1], str(bad["text"]), argv[2], str(bad["cut"]), *argv[3:]]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 2 and "pseudohealthy preprocess: 2 of 4 scans failed" in err
    assert _assert_units(out, units) == sorted(n for u in units for n in u)


def test_evaluate_goes_on_past_bad_scans_but_writes_no_partial_metrics(
    ensemble, tmp_path, monkeypatch, capsys
) -> None:
    argv, out, _ = _evaluate(tmp_path, ensemble)
    bad = _bad_inputs(tmp_path)
    s1, s2, m1, m2 = argv[2], argv[3], argv[5], argv[6]
    argv = ["evaluate", "--scans", s1, str(bad["text"]), s2, "--masks", m1, m1, m2, *argv[7:]]
    calls = _fake_restorer(monkeypatch)
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert str(bad["text"]) in line
    assert "1 of 3 scans failed; no metrics written" in err
    assert calls == ["FLAIR", "FLAIR"]  # the others went on, and their maps are kept for a rerun
    assert sorted(p.name for p in out.iterdir()) == ["anomaly_maps"]
    assert sorted(p.name for p in (out / "anomaly_maps").iterdir()) == [
        "p1_FLAIR_anomaly.nii.gz",
        "p2_FLAIR_anomaly.nii.gz",
    ]


def test_a_batch_stops_at_a_full_disk_and_says_what_was_not_attempted(capsys) -> None:
    batch = Batch("restore", 4)
    done = []
    for item in batch.each(range(4)):
        with batch.attempt():
            if item == 0:
                raise PseudohealthyError("x.nii.gz: truncated")
            if item == 2:
                raise OSError(errno.ENOSPC, ENOSPC, "/out/y.nii.gz")
            done.append(item)
    assert done == [1] and batch.finish() == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "pseudohealthy restore: error: x.nii.gz: truncated",
        f"pseudohealthy restore: error: /out/y.nii.gz: {ENOSPC}",
        "pseudohealthy restore: 2 of 4 scans failed (1 not attempted: stopped at the write error above)",
    ]
    one = Batch("synth", 1)
    with one.attempt():
        raise PseudohealthyError("bad")
    assert one.finish() == 2 and len(capsys.readouterr().err.splitlines()) == 1  # no count for one


# --- every file the commands write goes through data.files (or data.io.save_like) --------------

RAW_WRITES = {"savefig", "write_text", "write_bytes", "dump", "save", "to_csv", "imsave", "imwrite"}


def test_the_commands_write_only_through_the_atomic_writers() -> None:
    """No raw write in cli/, figures/ or evaluation/ outside data.files' callback (save_figure)."""
    offenders = []
    for folder in ("cli", "figures", "evaluation"):
        for path in sorted((SRC / folder).glob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                allowed = folder == "figures" and path.name == "__init__.py"  # save_figure's callback
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    if node.func.attr in RAW_WRITES and not allowed:
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.func.attr}(")
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                    modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
                    modes += [k.value.value for k in node.keywords if k.arg == "mode"]
                    if any(set(str(m)) & set("wax+") for m in modes):
                        offenders.append(f"{path.relative_to(SRC)}:{node.lineno} open(..., {modes})")
    assert not offenders, "\n".join(offenders)
