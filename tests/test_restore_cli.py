"""`pseudohealthy restore`: outputs in the input's exact geometry, JSON record, refusals, bad scans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pseudohealthy import __version__
from pseudohealthy.cli import main
from pseudohealthy.cli.restore import collect_scans, parse_slices
from pseudohealthy.data.io import load_scan
from pseudohealthy.errors import PseudohealthyError
from pseudohealthy.model import checkpoint
from pseudohealthy.model import network as model

BRATS = "lesion/brats2013/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"  # 240x240x155, LPS
FAST = ["--sampler", "ddim", "--steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ens")
    cfg = model.get_preset("tiny")
    for i, name in enumerate(("fold0", "fold1")):
        torch.manual_seed(i)
        checkpoint.save_checkpoint(model.build_model(cfg), cfg, {"fold": i}, root / name)
    return root


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory, shared_data: Path) -> Path:
    """A crop of a real BraTS FLAIR (still LPS, oblique-free) to keep the tests fast."""
    src = nib.load(shared_data / BRATS)
    path = tmp_path_factory.mktemp("scan") / "flair.nii.gz"
    nib.save(src.slicer[40:200:2, 30:210:2, 50:110], path)  # 80 x 90 x 60
    return path


def _restore(*args: str | Path) -> int:
    return main(["-q", "restore", *map(str, args)])


def test_real_scan_outputs_keep_the_input_geometry(
    shared_data: Path, ensemble_dir: Path, tmp_path: Path
) -> None:
    scan = shared_data / BRATS
    out = tmp_path / "out"
    rc = _restore(scan, "--ensemble", ensemble_dir, "-o", out, "--slices", "70:73", "--member-maps", *FAST)
    assert rc == 0
    name = "Flair_subtrMeanDivStd"
    src = nib.load(scan)
    for suffix in ("pseudohealthy", "anomaly", "anomaly_fold0", "anomaly_fold1"):
        img = nib.load(out / f"{name}_{suffix}.nii.gz")
        assert img.shape == src.shape
        np.testing.assert_allclose(img.affine, src.affine)
        assert nib.aff2axcodes(img.affine) == nib.aff2axcodes(src.affine) == ("L", "P", "S")
    # back in the canonical frame: only slices 70-72 changed; the rest is the input exactly
    vol = load_scan(scan)
    pseudo = load_scan(out / f"{name}_pseudohealthy.nii.gz").data
    anomaly = nib.as_closest_canonical(nib.load(out / f"{name}_anomaly.nii.gz")).get_fdata()
    others = np.setdiff1d(np.arange(vol.shape[2]), [70, 71, 72])
    np.testing.assert_array_equal(pseudo[:, :, others], vol.data[:, :, others])
    assert not anomaly[:, :, others].any()
    for k in (70, 71, 72):
        assert anomaly[:, :, k].max() > 0 and np.abs(pseudo[:, :, k] - vol.data[:, :, k]).max() > 0
    assert anomaly.min() >= 0 and anomaly.max() <= 1
    record = json.loads((out / f"{name}_restore.json").read_text())
    assert record["package_version"] == __version__ and record["scan"] == str(scan)
    assert list(record["slice_scores"]) == ["70", "71", "72"] and record["restored_slices"] == [70, 71, 72]
    assert [m["name"] for m in record["ensemble"]["members"]] == ["fold0", "fold1"]
    assert all(len(record["seeds"][k]) == 2 for k in ("70", "71", "72"))
    assert record["settings"]["sampler"] == "ddim" and record["settings"]["steps"] == 2
    assert record["device"] == "cpu" and record["timings"]["total_s"] > 0
    assert set(record["timings"]["per_slice_s"]) == {"70", "71", "72"}
    assert 0 < record["volume_score"] <= 1


def test_members_and_folder_input(small_scan: Path, ensemble_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(small_scan, folder / "a.nii.gz")
    shutil.copy(small_scan, folder / "a_anomaly.nii.gz")  # looks like an output: skipped
    (folder / "notes.txt").write_text("not a scan")
    assert collect_scans([folder]) == [folder / "a.nii.gz"]
    out = tmp_path / "out"
    args = ["--members", "fold1", "--member-maps", "--slices", "30,31", "--seed", "3"]
    assert _restore(folder, "--ensemble", ensemble_dir, "-o", out, *args, *FAST) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "a_anomaly.nii.gz",
        "a_anomaly_fold1.nii.gz",
        "a_preview.png",
        "a_pseudohealthy.nii.gz",
        "a_restore.json",
        "a_uncertainty.nii.gz",
    ]
    from PIL import Image

    with Image.open(out / "a_preview.png") as png:  # a real picture, not an empty file
        assert png.size[0] > 300 and png.size[1] > 200
    record = json.loads((out / "a_restore.json").read_text())
    assert [m["name"] for m in record["ensemble"]["members"]] == ["fold1"]
    assert record["settings"]["seed"] == 3 and record["restored_slices"] == [30, 31]
    # one member: its own map is the ensemble map
    ens = nib.load(out / "a_anomaly.nii.gz").get_fdata()
    np.testing.assert_allclose(nib.load(out / "a_anomaly_fold1.nii.gz").get_fdata(), ens, atol=1e-6)
    assert (
        _restore(
            folder / "a.nii.gz", "--ensemble", ensemble_dir, "-o", tmp_path / "o2", "--members", "nope", *FAST
        )
        == 2
    )


def test_never_writes_onto_inputs_or_existing_outputs(
    small_scan: Path, ensemble_dir: Path, tmp_path: Path, capsys
) -> None:
    scan = tmp_path / "x.nii.gz"
    shutil.copy(small_scan, scan)
    decoy = tmp_path / "x_pseudohealthy.nii.gz"  # the output name of x, given as an input too
    shutil.copy(small_scan, decoy)
    before = decoy.read_bytes(), scan.read_bytes()
    rc = _restore(scan, decoy, "--ensemble", ensemble_dir, "-o", tmp_path, "--slices", "30", *FAST)
    assert rc == 2
    err = capsys.readouterr().err
    assert "refusing to write onto an input file" in err and str(decoy) in err
    assert (decoy.read_bytes(), scan.read_bytes()) == before
    # the decoy itself was restored (its own outputs do not clash with an input)
    assert (tmp_path / "x_pseudohealthy_anomaly.nii.gz").is_file()
    assert not (tmp_path / "x_anomaly.nii.gz").exists()

    out = tmp_path / "out"
    assert _restore(scan, "--ensemble", ensemble_dir, "-o", out, "--slices", "30", *FAST) == 0
    first = (out / "x_anomaly.nii.gz").read_bytes()
    assert _restore(scan, "--ensemble", ensemble_dir, "-o", out, "--slices", "30", *FAST) == 2
    assert "already exists" in capsys.readouterr().err
    args = ["--slices", "31", "--overwrite"]
    assert _restore(scan, "--ensemble", ensemble_dir, "-o", out, *args, *FAST) == 0
    assert (out / "x_anomaly.nii.gz").read_bytes() != first


def test_bad_scans_are_reported_and_the_rest_restored(
    small_scan: Path, ensemble_dir: Path, tmp_path: Path, capsys
) -> None:
    good = tmp_path / "good.nii.gz"
    shutil.copy(small_scan, good)
    text = tmp_path / "text.nii.gz"
    text.write_text("hello")
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(small_scan.read_bytes()[:300])
    missing = tmp_path / "missing.nii.gz"
    out = tmp_path / "out"
    rc = _restore(
        text, good, truncated, missing, "--ensemble", ensemble_dir, "-o", out, "--slices", "30", *FAST
    )
    assert rc == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(lines) == 3
    for path, word in ((text, "not gzip"), (truncated, "truncated"), (missing, "not found")):
        assert any(str(path) in ln and word in ln for ln in lines), (path, lines)
    assert (out / "good_anomaly.nii.gz").is_file() and (out / "good_restore.json").is_file()
    assert not any(p.name.startswith(("text", "cut", "missing")) for p in out.iterdir())
    # slices without brain, and a missing ensemble, are one-line errors too
    img = nib.load(small_scan)
    data = np.asarray(img.dataobj).copy()
    data[:, :, 0] = data.min()  # LPS: stored z is canonical z
    empty = tmp_path / "empty0.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine, img.header), empty)
    assert _restore(empty, "--ensemble", ensemble_dir, "-o", out / "b", "--slices", "0:1", *FAST) == 2
    assert "none of the requested slices" in capsys.readouterr().err
    assert _restore(good, "--ensemble", tmp_path / "nowhere", "-o", out / "c", *FAST) == 2
    err = capsys.readouterr().err
    assert "ensemble not found" in err and "bundled: demo" in err and len(err.strip().splitlines()) == 1


def test_uncertainty_output(small_scan: Path, ensemble_dir: Path, tmp_path: Path, capsys) -> None:
    src = nib.load(small_scan)
    brain = np.zeros(src.shape, dtype=np.uint8)
    brain[20:60, 15:75, :] = 1  # the restored foreground: this box, in slices 30 and 31
    brain_path = tmp_path / "brain.nii.gz"
    nib.save(nib.Nifti1Image(brain, src.affine), brain_path)
    scan = tmp_path / "x.nii.gz"
    shutil.copy(small_scan, scan)
    out = tmp_path / "out"
    args = ["--slices", "30,31", "--brain-mask", brain_path, *FAST]
    assert _restore(scan, "--ensemble", ensemble_dir, "-o", out, *args) == 0
    img = nib.load(out / "x_uncertainty.nii.gz")
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine)
    spread = img.get_fdata()
    restored = brain.astype(bool)
    restored[:, :, [k for k in range(src.shape[2]) if k not in (30, 31)]] = False  # LPS: z is z
    assert not spread[~restored].any()
    assert spread[restored].max() > 0 and spread.min() >= 0  # two members disagree somewhere
    record = json.loads((out / "x_restore.json").read_text())
    assert set(record["uncertainty_scores"]) == {"30", "31"}
    assert record["outputs"]["uncertainty"] == str(out / "x_uncertainty.nii.gz")
    # a folder run skips it as an output; --overwrite rules apply to it like to the others
    assert collect_scans([out]) == []
    for p in out.iterdir():
        if p.name != "x_uncertainty.nii.gz":
            p.unlink()
    assert _restore(scan, "--ensemble", ensemble_dir, "-o", out, *args) == 2
    assert "x_uncertainty.nii.gz: already exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["x_uncertainty.nii.gz"]
    # one member: no disagreement anywhere
    one = tmp_path / "one"
    assert _restore(scan, "--ensemble", ensemble_dir, "-o", one, "--members", "fold0", *args) == 0
    assert not nib.load(one / "x_uncertainty.nii.gz").get_fdata().any()


def test_help_and_bundled_ensemble_by_name(tmp_path: Path, capsys) -> None:
    from pseudohealthy.data.sample import sample_scan_path

    with pytest.raises(SystemExit):
        main(["restore", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "<name>_uncertainty.nii.gz" in text and "standard deviation" in text and "demo" in text
    out = tmp_path / "out"
    args = ["--slices", "60", "--no-preview", *FAST]
    rc = _restore(sample_scan_path(), "--ensemble", "demo", "-o", out, *args)
    assert rc == 0
    record = json.loads((out / "brats2013_pat0006_flair_restore.json").read_text())
    assert len(record["ensemble"]["members"]) == 3 and record["restored_slices"] == [60]
    assert (out / "brats2013_pat0006_flair_uncertainty.nii.gz").is_file()


def test_parse_slices() -> None:
    assert parse_slices(None, 10) is None
    assert parse_slices("2:5", 10) == [2, 3, 4]
    assert parse_slices("8:, 1", 10) == [8, 9, 1]
    assert parse_slices(":2,5:7", 10) == [0, 1, 5, 6]
    for bad in ("a:b", "1-3", ",", "7:3"):
        with pytest.raises(PseudohealthyError, match="--slices"):
            parse_slices(bad, 10)


def test_ssim_flags(small_scan: Path, ensemble_dir: Path, tmp_path: Path, capsys) -> None:
    """The reference's SSIM constants are the default (``--faithful-ssim`` still accepted);
    ``--unit-ssim`` gives data range 1 maps; the record says which; the two flags exclude each other."""
    maps, settings = {}, {}
    for flag in ("", "--faithful-ssim", "--unit-ssim"):
        out = tmp_path / (flag.strip("-") or "default")
        extra = [flag] if flag else []
        assert _restore(small_scan, "--ensemble", ensemble_dir, "-o", out, "--slices", "30", "--no-preview",
                        *FAST, *extra) == 0  # fmt: skip
        maps[flag] = nib.load(out / "flair_anomaly.nii.gz").get_fdata()
        settings[flag] = json.loads((out / "flair_restore.json").read_text())["settings"]
    assert [settings[f]["faithful_ssim"] for f in ("", "--faithful-ssim", "--unit-ssim")] == [
        True,
        True,
        False,
    ]
    np.testing.assert_array_equal(maps[""], maps["--faithful-ssim"])
    # the same restorations (same seed): constants 65,025 times larger give a far smaller map
    assert 0 < maps[""].max() < maps["--unit-ssim"].max() / 10
    with pytest.raises(SystemExit) as exc:
        _restore(
            small_scan, "--ensemble", ensemble_dir, "-o", tmp_path / "both", "--faithful-ssim", "--unit-ssim"
        )
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["restore", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--unit-ssim" in text and "data range 255 on [0, 1] images (the default)" in text


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("scan_anomaly.nii.gz", "anomaly"),
        ("scan_anomaly.nii", "anomaly"),
        ("scan_anomaly_fold_2.nii.gz", "member"),
        ("scan_uncertainty.nii.gz", "uncertainty"),
        ("scan_pseudohealthy.nii.gz", None),
        ("scan.nii.gz", None),
        ("scan_anomaly.png", None),
        ("_anomaly_.nii.gz", None),
    ],
)
def test_map_kind_names_every_map_restore_writes(name: str, kind: str | None) -> None:
    """The one owner of the outputs' names tells the reader which map a file is."""
    from pseudohealthy.engine.outputs import map_kind

    assert map_kind(name) == kind


def test_map_kind_reads_back_the_names_restore_gives(tmp_path: Path) -> None:
    """Every map name ``restore`` writes (with --member-maps) is recognised as the map it is."""
    from pseudohealthy.cli.restore import _outputs
    from pseudohealthy.engine.outputs import map_kind

    outputs = _outputs(tmp_path, "scan", ["fold_2", "fold_6"], preview=True)
    kinds = {key: map_kind(path) for key, path in outputs.items()}
    assert kinds == {
        "pseudo_healthy": None,
        "anomaly": "anomaly",
        "uncertainty": "uncertainty",
        "anomaly_fold_2": "member",
        "anomaly_fold_6": "member",
        "preview": None,
        "json": None,
    }
