"""Finding the bundled data by name: `pseudohealthy sample` and `--ensemble demo`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pseudohealthy.cli import main
from pseudohealthy.data import sample
from pseudohealthy.data.files import is_temporary_name
from pseudohealthy.errors import PseudohealthyError


def test_sample_prints_the_bundled_paths(capsys) -> None:
    assert main(["sample"]) == 0
    lines = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert lines["scan"] == str(sample.sample_scan_path())
    assert lines["mask"] == str(sample.sample_mask_path())
    assert (
        lines["ensemble"].startswith(str(sample.demo_ensemble_path()))
        and "--ensemble demo" in lines["ensemble"]
    )
    for what, path in (("scan", sample.sample_scan_path()), ("ensemble", sample.demo_ensemble_path())):
        assert main(["sample", what]) == 0
        assert capsys.readouterr().out == f"{path}\n"


def test_sample_copy(tmp_path: Path, capsys) -> None:
    dest = tmp_path / "data"
    assert main(["sample", "--copy", str(dest)]) == 0
    printed = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert set(printed) == {"scan", "mask", "ensemble", "license"}
    assert all(Path(p).parent == dest and Path(p).exists() for p in printed.values())
    assert Path(printed["scan"]).read_bytes() == sample.sample_scan_path().read_bytes()
    bundled = sorted(
        p.relative_to(sample.demo_ensemble_path()) for p in sample.demo_ensemble_path().rglob("*")
    )
    copied = sorted(p.relative_to(dest / "demo_ensemble") for p in (dest / "demo_ensemble").rglob("*"))
    assert copied == bundled
    assert not any(is_temporary_name(p) for p in dest.iterdir())
    # the copy is an ensemble the CLI reads by path
    from pseudohealthy.model.checkpoint import Ensemble

    assert len(Ensemble.from_dir(dest / "demo_ensemble").names) == 3
    # nothing replaced without --overwrite (one line), and --overwrite replaces
    (dest / "demo_ensemble" / "extra.txt").write_text("mine")
    assert main(["sample", "--copy", str(dest)]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exist" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (dest / "demo_ensemble" / "extra.txt").exists()
    assert main(["-q", "sample", "--copy", str(dest), "--overwrite"]) == 0
    assert not (dest / "demo_ensemble" / "extra.txt").exists()
    assert sorted(p.name for p in dest.iterdir()) == sorted(Path(p).name for p in printed.values())
    # a file where the folder should be: one line
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sample", "--copy", str(blocker)]) == 2
    assert "--copy" in capsys.readouterr().err


def test_resolve_ensemble(tmp_path: Path, monkeypatch) -> None:
    assert sample.resolve_ensemble("demo") == sample.demo_ensemble_path()
    assert sample.resolve_ensemble(Path("demo")) == sample.demo_ensemble_path()
    assert set(sample.BUNDLED_ENSEMBLES) >= {"demo"}
    own = tmp_path / "mine"
    own.mkdir()
    assert sample.resolve_ensemble(own) == own  # a path is taken as it is
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert sample.resolve_ensemble("demo") == Path("demo")  # an existing folder wins over the name
    with pytest.raises(PseudohealthyError, match=r"nope: ensemble not found.*bundled: demo"):
        sample.resolve_ensemble("nope")
    monkeypatch.setitem(sample.BUNDLED_ENSEMBLES, "demo-t2", "no_such_folder")
    with pytest.raises(PseudohealthyError, match="'demo-t2' is not installed"):
        sample.resolve_ensemble("demo-t2")
    listed = "bundled: demo, demo-epsilon, demo-sample, demo-scratch, demo-t1, demo-t2"
    with pytest.raises(PseudohealthyError, match=listed):
        sample.resolve_ensemble("other")
    assert "demo-t2" not in sample.installed_ensembles()  # only what is installed is offered
    monkeypatch.delitem(sample.BUNDLED_ENSEMBLES, "demo-t2")


def test_evaluate_and_view_take_the_name(tmp_path: Path, capsys) -> None:
    # evaluate: the unknown name is refused in one line, before anything is computed
    scan, mask = sample.sample_scan_path(), sample.sample_mask_path()
    args = [
        "evaluate",
        "--scans",
        str(scan),
        "--masks",
        str(mask),
        "--ensemble",
        "nope",
        "-o",
        str(tmp_path / "o"),
    ]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and "nope: ensemble not found" in err and "bundled: demo" in err, err
    pytest.importorskip("napari")
    from pseudohealthy.cli import view

    with pytest.raises(PseudohealthyError, match="bundled: demo"):
        view.open_viewer(scan, "nope", mask, viewer=object())


def test_help_stays_light() -> None:
    code = (
        "import sys; from pseudohealthy.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('numpy', 'torch', 'nibabel') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert (
        "sample"
        in subprocess.run(
            [sys.executable, "-m", "pseudohealthy", "--help"], capture_output=True, text=True, check=True
        ).stdout
    )


def test_both_bundled_ensembles_resolve_by_name_and_differ_in_recipe() -> None:
    from pseudohealthy.model.checkpoint import Ensemble

    v = Ensemble.from_dir(sample.resolve_ensemble("demo"))
    epsilon = Ensemble.from_dir(sample.resolve_ensemble("demo-epsilon"))
    assert {m.prediction for m in v.members} == {"v"}
    assert {m.prediction for m in epsilon.members} == {"epsilon"}
    assert {m.schedule.centred for m in epsilon.members} == {True}  # the legacy [-1, 1] range
    assert sorted(m.info["fold"] for m in v.members) == sorted(m.info["fold"] for m in epsilon.members)
    t1 = Ensemble.from_dir(sample.resolve_ensemble("demo-t1"))
    assert {m.prediction for m in t1.members} == {"v"}
    assert {m.info.get("modality") for m in t1.members} == {"T1"}
    assert {m.info.get("modality") for m in v.members} == {"FLAIR"}
    x0 = Ensemble.from_dir(sample.resolve_ensemble("demo-sample"))
    assert {m.prediction for m in x0.members} == {"sample"}
    assert {m.schedule.centred for m in x0.members} == {False}
    assert sorted(m.info["fold"] for m in x0.members) == sorted(m.info["fold"] for m in v.members)
    assert all(m.info["init_from"] is None for m in x0.members)  # trained from scratch
    assert list(sample.installed_ensembles()) == list(sample.BUNDLED_ENSEMBLES)  # all installed
    for name in sample.BUNDLED_ENSEMBLES:
        assert sample.bundled_name(sample.bundled_ensemble_path(name)) == name
    assert sample.bundled_name(sample.sample_data_dir()) is None
