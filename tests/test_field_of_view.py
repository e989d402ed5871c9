"""The model frame's physical scale: members record their training slices' field of view
(``normalisation.fov_mm``) and a scan cropped tighter is padded to it instead of magnified."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pseudohealthy.data.io import load_mask, load_scan, volume_from_array
from pseudohealthy.data.preprocess import MAX_FOV_MM, MAX_SIDE_FACTOR, SliceGeometry, fov_side, prepare_scan
from pseudohealthy.engine import restore
from pseudohealthy.errors import CheckpointError
from pseudohealthy.model.checkpoint import Ensemble
from test_restore import _save_ensemble

BRATS = "lesion/brats2013/brats_2013_pat0003_1"


def test_geometry_pads_to_the_minimum_side_and_back():
    rng = np.random.default_rng(0)
    img = rng.random((30, 24)).astype(np.float32)
    for square in ("pad", "crop"):
        geo = SliceGeometry((30, 24), 60, square, min_side=60)
        assert geo.side == 60
        framed = geo.to_model(img, order=0)
        assert framed.shape == (60, 60) and np.count_nonzero(framed) == img.size  # padded, not scaled
        np.testing.assert_array_equal(framed[15:45, 18:42], img)
        np.testing.assert_array_equal(geo.from_model(framed, order=0), img)
    # below the slice's own side it changes nothing: the pad and crop squares as before
    assert SliceGeometry((30, 24), 16, "pad", min_side=10).side == 30
    assert SliceGeometry((30, 24), 16, "crop", min_side=10).side == 24
    with pytest.raises(ValueError, match="min_side"):
        SliceGeometry((30, 24), 16, min_side=MAX_SIDE_FACTOR * 30 + 1)


def test_fov_side_rule():
    assert fov_side(None, (1.0, 1.0, 1.0), (160, 152)) == 0
    assert fov_side(240.0, (1.0, 1.0, 3.0), (160, 152)) == 240
    assert fov_side(240.0, (2.0, 2.0, 1.0), (100, 100)) == 120
    assert fov_side(240.0, (0.1, 0.1, 1.0), (100, 100)) == MAX_SIDE_FACTOR * 100  # capped
    for bad in (0.0, -5.0, MAX_FOV_MM * 2, float("nan")):
        with pytest.raises(ValueError, match="field of view"):
            fov_side(bad, (1.0, 1.0, 1.0), (10, 10))


def test_a_cropped_scan_keeps_the_training_scale(shared_data):
    """Patient 0003 cropped to its brain (as the bundled sample is) fills the model frame like the
    240 mm original once the field of view is given; without it the brain is magnified."""
    vol = load_scan(shared_data / BRATS / "Flair_subtrMeanDivStd.nii.gz")
    brain = load_mask(shared_data / BRATS / "brainmask.nii.gz", vol)
    xs, ys = np.flatnonzero(brain.any(axis=(1, 2))), np.flatnonzero(brain.any(axis=(0, 2)))
    box = (slice(xs[0] - 8, xs[-1] + 9), slice(ys[0] - 8, ys[-1] + 9), slice(None))
    cropped = volume_from_array(vol.data[box], affine=vol.affine, name="cropped")
    full = prepare_scan(vol, size=64, brain_mask=brain)
    kept = prepare_scan(cropped, size=64, brain_mask=brain[box], fov_mm=240.0)
    magnified = prepare_scan(cropped, size=64, brain_mask=brain[box])
    assert full.geometry.side == kept.geometry.side == 240 and magnified.geometry.side < 200
    frames = {"full": full, "kept": kept, "mag": magnified}
    area = {name: p.masks.sum(axis=(1, 2)).mean() for name, p in frames.items()}
    assert area["kept"] == pytest.approx(area["full"], rel=0.03)
    assert area["mag"] > 1.5 * area["full"]
    back = kept.to_volume(kept.masks)[:, :, kept.indices]  # and it lines up with the scan on the way back
    truth = brain[box][:, :, kept.indices]
    assert 2 * (back & truth).sum() / (back.sum() + truth.sum()) > 0.95


def test_restore_uses_the_recorded_field_of_view(tmp_path: Path):
    data = np.zeros((32, 40, 6), np.float32)
    data[8:24, 10:30] = 100.0
    volume = volume_from_array(data, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    meta = {"normalisation": {"method": "max", "square": "pad", "size": 32, "fov_mm": 80.0}}
    ens = Ensemble.from_dir(_save_ensemble(tmp_path / "fov", "tiny", names=("a",), meta=meta))
    assert restore.prepare_for(volume, ens).geometry.side == 80
    old = Ensemble.from_dir(
        _save_ensemble(tmp_path / "old", "tiny", names=("a",), meta={"normalisation": {}})
    )
    assert restore.prepare_for(volume, old).geometry.side == 40  # members from before: as they were


@pytest.mark.parametrize("bad", [-1.0, 0, MAX_FOV_MM + 1, "240", True])
def test_checkpoint_refuses_an_absurd_field_of_view(tmp_path: Path, bad):
    root = _save_ensemble(tmp_path, "tiny", names=("a",), meta={"normalisation": {"size": 32}})
    info_path = root / "a" / "pseudohealthy.json"
    info = json.loads(info_path.read_text())
    info["normalisation"]["fov_mm"] = bad
    info_path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="fov_mm"):
        Ensemble.from_dir(root)


def test_every_bundled_ensemble_records_the_field_of_view_of_its_frame():
    """The FLAIR ensembles: the 240 mm BraTS slices; ``demo-t1``: the bundled MNI frame that
    ``pseudohealthy preprocess`` writes, where the recorded value changes nothing."""
    from pseudohealthy.data.registration import load_template
    from pseudohealthy.data.sample import BUNDLED_ENSEMBLES, bundled_ensemble_path

    mni = load_template().image
    side_mm = max(mni.data.shape[:2]) * float(np.mean(mni.spacing[:2]))
    for name in BUNDLED_ENSEMBLES:
        for member in sorted(bundled_ensemble_path(name).glob("fold_*")):
            fov = json.loads((member / "pseudohealthy.json").read_text())["normalisation"]["fov_mm"]
            assert fov == (side_mm if name == "demo-t1" else 240.0), (name, member.name)
    plain = prepare_scan(mni, size=64)
    np.testing.assert_array_equal(prepare_scan(mni, size=64, fov_mm=side_mm).images, plain.images)
