"""The restoration engine: batching, per-slice seeds, priority order, cancel, OOM retry, results."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import phantom
from pseudohealthy.data.io import volume_from_array
from pseudohealthy.data.preprocess import NORMS
from pseudohealthy.device import DeviceError
from pseudohealthy.engine import restore, sampler
from pseudohealthy.engine.defaults import BASELINE_T_START
from pseudohealthy.engine.restore import Progress, SliceResult, restore_iter, restore_volume
from pseudohealthy.engine.settings import RestoreSettings, SettingsError
from pseudohealthy.errors import PseudohealthyError, ScanError
from pseudohealthy.model import checkpoint
from pseudohealthy.model import network as model
from pseudohealthy.model.checkpoint import Ensemble

MEMBERS = ("fold0", "fold1", "fold2")


def _save_ensemble(root: Path, preset: str, names=MEMBERS, meta=None) -> Path:
    cfg = model.get_preset(preset)
    for i, name in enumerate(names):
        torch.manual_seed(i)
        net = model.build_model(cfg)
        with torch.no_grad():  # small non-zero output head: the untrained UNet predicts ~0
            for p in net.unet.out.parameters():
                p.normal_(0, 0.05)
        checkpoint.save_checkpoint(net, cfg, {"fold": i, **(meta or {})}, root / name)
    return root


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory) -> Path:
    return _save_ensemble(tmp_path_factory.mktemp("ens"), "tiny")


@pytest.fixture(scope="module")
def baseline_dir(tmp_path_factory) -> Path:
    return _save_ensemble(tmp_path_factory.mktemp("base"), "tiny-baseline", names=("b0", "b1"))


@pytest.fixture
def ensemble(ensemble_dir: Path) -> Ensemble:
    return Ensemble.from_dir(ensemble_dir)  # fresh: no model cached (and no hooks) across tests


@pytest.fixture(scope="module")
def volume():
    # 32 x 40 axial slices (not square: the pad/resize geometry is exercised), 12 slices
    data = phantom((32, 40, 12)) * 300.0 + 20.0
    return volume_from_array(data, affine=np.diag([1.0, 1.2, 2.0, 1.0]), name="phantom")


def _results(items) -> list[SliceResult]:
    return [i for i in items if isinstance(i, SliceResult)]


def _fast(**kw) -> RestoreSettings:
    return RestoreSettings(**{"sampler": "ddim", "steps": 4, "device": "cpu", **kw})


def test_results_in_priority_order_with_progress(volume, ensemble) -> None:
    items = list(restore_iter(volume, ensemble, _fast(batch_size=2), slices=[7, 3, 5, 3]))
    results = _results(items)
    assert [r.index for r in results] == [7, 3, 5]  # the order asked for, duplicates dropped
    progress = [i for i in items if isinstance(i, Progress)]
    assert progress[0].done == 0 and progress[-1].done == progress[-1].total == 3 * 4
    assert all(b.done >= a.done for a, b in itertools.pairwise(progress))
    # a progress item after every step of every batch (2 batches x 4 steps) plus the start
    assert len(progress) == 1 + 2 * 4
    fg = volume.data > volume.data.min()
    for r in results:
        k = r.index
        assert r.restoration.shape == r.anomaly.shape == r.pseudo_healthy.shape == (32, 40)
        assert r.restoration.dtype == r.anomaly.dtype == np.float32
        assert 0 <= r.anomaly.min() and r.anomaly.max() <= 1 and r.anomaly[fg[:, :, k]].max() > 0
        assert not r.anomaly[~fg[:, :, k]].any() and not r.restoration[~fg[:, :, k]].any()
        assert 0 <= r.restoration.min() and r.restoration.max() <= 1
        # outside the foreground the pseudo-healthy slice is the input, inside it is in scan units
        np.testing.assert_array_equal(r.pseudo_healthy[~fg[:, :, k]], volume.data[:, :, k][~fg[:, :, k]])
        assert r.pseudo_healthy[fg[:, :, k]].min() >= 20.0 - 1e-3
        assert 0 < r.score <= 1 and len(r.seeds) == len(r.member_scores) == 3
        assert r.score == pytest.approx(np.mean(r.member_scores), rel=1e-5)
        assert r.member_maps is None and r.seconds > 0


def test_slice_result_independent_of_batch_and_order(volume, ensemble) -> None:
    together = _results(restore_iter(volume, ensemble, _fast(sampler="ddpm", batch_size=3), slices=[4, 5, 6]))
    alone = _results(restore_iter(volume, ensemble, _fast(sampler="ddpm", batch_size=1), slices=[5]))
    swapped = _results(restore_iter(volume, ensemble, _fast(sampler="ddpm"), slices=[6, 5, 9]))
    a, b, c = together[1], alone[0], swapped[1]
    assert a.index == b.index == c.index == 5 and a.seeds == b.seeds == c.seeds
    for other in (b, c):
        np.testing.assert_allclose(other.restoration, a.restoration, atol=1e-5)
        np.testing.assert_allclose(other.anomaly, a.anomaly, atol=1e-5)
    # the seed matters (ddpm draws fresh noise at every step), and so does the slice
    reseeded = _results(restore_iter(volume, ensemble, _fast(sampler="ddpm", seed=1), slices=[5]))[0]
    assert np.abs(reseeded.restoration - a.restoration).max() > 1e-3
    assert reseeded.seeds != a.seeds and together[0].seeds != a.seeds


def test_member_selection_and_member_maps(volume, ensemble_dir: Path) -> None:
    full = Ensemble.from_dir(ensemble_dir)
    settings = _fast(keep_member_maps=True)
    res = _results(restore_iter(volume, full, settings, slices=[6]))[0]
    assert res.member_maps.shape == (3, 32, 40)
    # the ensemble map is the members' mean (re-zeroed outside the foreground)
    np.testing.assert_allclose(res.anomaly, res.member_maps.mean(axis=0), atol=1e-5)
    assert np.abs(res.member_maps[0] - res.member_maps[2]).max() > 1e-3
    # a member's result does not depend on which other members run
    one = _results(restore_iter(volume, full.select(["fold2"]), settings, slices=[6]))[0]
    assert one.member_maps.shape == (1, 32, 40) and one.seeds == [res.seeds[2]]
    np.testing.assert_allclose(one.member_maps[0], res.member_maps[2], atol=1e-5)
    np.testing.assert_allclose(one.anomaly, res.member_maps[2], atol=1e-5)


def test_should_stop_stops_within_one_step(volume, ensemble) -> None:
    calls = []
    for m in ensemble.members:
        m.model("cpu").register_forward_hook(lambda *_: calls.append(1))
    stop = {"now": False}
    gen = restore_iter(
        volume, ensemble, _fast(batch_size=1), slices=[5, 6, 7], should_stop=lambda: stop["now"]
    )
    seen: list[SliceResult] = []
    for item in gen:
        if isinstance(item, SliceResult):
            seen.append(item)
        elif item.done == 4 + 1:  # first step of the second slice
            stop["now"] = True
            n_calls = len(calls)
    assert [r.index for r in seen] == [5]  # the finished slice stays valid, nothing more came
    assert len(calls) == n_calls == 3 * 5  # 3 members x (4 steps + 1): no step after the stop
    assert seen[0].anomaly.max() > 0


def test_should_stop_before_anything_finished(volume, ensemble) -> None:
    flag = iter([False, False, True])  # stop after the first denoising step
    items = list(restore_iter(volume, ensemble, _fast(), slices=[5, 6], should_stop=lambda: next(flag, True)))
    assert not _results(items)
    assert [p.done for p in items] == [0, 2]  # the start, then one step of the 2-slice batch


def test_restore_volume_collects_everything(volume, ensemble) -> None:
    res = restore_volume(volume, ensemble, _fast(keep_member_maps=True), slices=[0, 6, 4])
    fg = volume.data > volume.data.min()
    assert not fg[:, :, 0].any()  # an empty slice is skipped, not restored
    assert res.restored == [6, 4] and set(res.slice_scores) == set(res.seeds) == {4, 6}
    assert res.completed and res.members == list(MEMBERS) and res.device == "cpu"
    assert res.pseudo_healthy.shape == res.anomaly.shape == volume.data.shape
    assert res.member_maps.shape == (3, *volume.data.shape)
    untouched = np.ones(volume.data.shape, dtype=bool)
    untouched[:, :, [4, 6]] = ~fg[:, :, [4, 6]]
    np.testing.assert_array_equal(res.pseudo_healthy[untouched], volume.data[untouched])
    assert not res.anomaly[untouched].any() and not res.member_maps[:, untouched].any()
    assert np.abs(res.pseudo_healthy - volume.data)[~untouched].max() > 0
    assert res.volume_score == pytest.approx(np.mean([res.slice_scores[4], res.slice_scores[6]]))
    assert res.record.to_dict()["volume_score"] == res.volume_score
    # the members' disagreement: a map per slice, 0 outside the restored foreground, and its score
    assert res.uncertainty.shape == volume.data.shape and not res.uncertainty[untouched].any()
    assert res.uncertainty[~untouched].max() > 0
    assert set(res.record.uncertainty_scores) == {4, 6} and res.record.uncertainty_scores[4] > 0
    assert res.settings["sampler"] == "ddim" and res.settings["n_steps"] == 4
    assert res.settings["t_start"] is None and res.settings["image_size"] == 32
    assert res.timings["total_s"] >= sum(res.timings["per_slice_s"].values()) > 0
    # the same slice from restore_iter is the same as in the collected volume
    single = _results(restore_iter(volume, ensemble, _fast(), slices=[4]))[0]
    np.testing.assert_allclose(res.anomaly[:, :, 4], single.anomaly, atol=1e-6)
    assert res.slice_scores[4] == pytest.approx(single.score)


def test_default_is_every_foreground_slice(volume, ensemble) -> None:
    progress: list[Progress] = []
    res = restore_volume(volume, ensemble, _fast(steps=1), progress=progress.append)
    fg_slices = [k for k in range(12) if (volume.data[:, :, k] > volume.data.min()).any()]
    assert sorted(res.restored) == fg_slices and 0 not in res.restored
    assert progress[-1].done == progress[-1].total and progress[-1].slices_total == len(fg_slices)


def test_unconditioned_baseline_uses_partial_noising(volume, baseline_dir: Path) -> None:
    ens = Ensemble.from_dir(baseline_dir)
    assert not ens.conditioned
    res = restore_volume(volume, ens, RestoreSettings(sampler="ddpm", steps=50, device="cpu"), slices=[5])
    assert res.settings["t_start"] == BASELINE_T_START == 250
    assert res.settings["n_steps"] == 1 + 13  # t = 250, then 240, 220, ..., 0 of the 50-step DDPM
    assert res.anomaly[:, :, 5].max() > 0 and np.isfinite(res.pseudo_healthy).all()
    shallow_settings = RestoreSettings(sampler="ddpm", steps=50, device="cpu", t_start=30)
    shallow = restore_volume(volume, ens, shallow_settings, slices=[5])
    assert shallow.settings["n_steps"] == 1 + 2
    # starting closer to the input leaves the restoration closer to it
    assert shallow.slice_scores[5] < res.slice_scores[5]
    with pytest.raises(SettingsError, match="t_start"):
        restore_volume(volume, ens, RestoreSettings(device="cpu", t_start=1000), slices=[5])


def _out_of_memory_above_one(real, sizes: list[int]):
    """``real`` (a ``restore_frame_steps``) that records batch sizes and runs out of memory
    (simulated) for batches above one slice."""

    def flaky(models, names, images, *args, **kw):
        sizes.append(images.shape[0])
        if images.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        yield from real(models, names, images, *args, **kw)

    return flaky


def _always_out_of_memory(*args, **kw):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
    yield


def test_cuda_out_of_memory_halves_the_batch(volume, ensemble, monkeypatch, caplog) -> None:
    sizes: list[int] = []
    flaky = _out_of_memory_above_one(restore.restore_frame_steps, sizes)
    expected = _results(restore_iter(volume, ensemble, _fast(batch_size=1), slices=[3, 4, 5, 6]))
    monkeypatch.setattr(restore, "restore_frame_steps", flaky)
    with caplog.at_level(logging.WARNING, logger="pseudohealthy.engine.restore"):
        got = _results(restore_iter(volume, ensemble, _fast(batch_size=4), slices=[3, 4, 5, 6]))
    assert sizes == [4, 2, 1, 1, 1, 1]
    assert "out of memory" in caplog.text
    assert [r.index for r in got] == [3, 4, 5, 6]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a.anomaly, b.anomaly, atol=1e-6)

    monkeypatch.setattr(restore, "restore_frame_steps", _always_out_of_memory)
    with pytest.raises(DeviceError, match="even with one slice"):
        list(restore_iter(volume, ensemble, _fast(batch_size=2), slices=[3, 4]))


def test_model_frame_restore_halves_the_batch(volume, ensemble, monkeypatch, caplog) -> None:
    """``evaluate --frame model`` restores through the same out-of-memory halving as the engine."""
    from pseudohealthy.engine import frame as engine_frame
    from pseudohealthy.evaluation.frame import restore_frames

    sizes: list[int] = []
    flaky = _out_of_memory_above_one(engine_frame.restore_frame_steps, sizes)
    slices = [3, 4, 5, 6]
    expected = restore_frames(volume, ensemble, _fast(batch_size=4), slices=slices)
    monkeypatch.setattr(engine_frame, "restore_frame_steps", flaky)
    with caplog.at_level(logging.WARNING, logger="pseudohealthy.engine.restore"):
        got = restore_frames(volume, ensemble, _fast(batch_size=4), slices=slices)
    assert sizes == [4, 2, 1, 1, 1, 1]
    assert "out of memory" in caplog.text
    assert got.restored.tolist() == expected.restored.tolist() == slices
    assert expected.maps[slices].max() > 0
    np.testing.assert_allclose(got.maps, expected.maps, atol=1e-6)
    np.testing.assert_allclose(got.restorations, expected.restorations, atol=1e-6)

    monkeypatch.setattr(engine_frame, "restore_frame_steps", _always_out_of_memory)
    with pytest.raises(DeviceError, match="even with one slice"):
        restore_frames(volume, ensemble, _fast(batch_size=2), slices=[3, 4])


def test_samplers_and_settings_errors(volume, ensemble) -> None:
    for name, steps in (("dpm", 3), ("ddpm", 2)):
        res = _results(restore_iter(volume, ensemble, _fast(sampler=name, steps=steps), slices=[5]))
        assert res[0].anomaly.max() > 0
    for bad in ({"sampler": "euler"}, {"steps": 0}, {"seed": -1}, {"batch_size": 0}, {"precision": "fp8"}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            restore_iter(volume, ensemble, _fast(**bad))
    assert issubclass(SettingsError, PseudohealthyError)
    with pytest.raises(ScanError, match=r"outside 0\.\.11"):
        restore_iter(volume, ensemble, _fast(), slices=[5, 12])


@pytest.mark.parametrize("method", NORMS[1:])
def test_normalisation_from_member_metadata(volume, tmp_path: Path, method: str) -> None:
    meta = {"normalisation": {"method": method, "square": "crop", "size": 32}}
    ens = Ensemble.from_dir(_save_ensemble(tmp_path, "tiny", names=("a",), meta=meta))
    prepared = restore.prepare_for(volume, ens)
    assert prepared.norm.method == method and prepared.geometry.square == "crop"
    assert prepared.geometry.size == 32
    # explicit settings win over the metadata
    prepared = restore.prepare_for(volume, ens, RestoreSettings(norm="max", square="pad"))
    assert prepared.norm.method == "max" and prepared.geometry.square == "pad"


def test_slice_seed_is_stable_and_distinct() -> None:
    s = sampler.slice_seed(0, 5, "fold0")
    assert s == sampler.slice_seed(0, 5, "fold0")
    others = {
        sampler.slice_seed(0, 6, "fold0"),
        sampler.slice_seed(1, 5, "fold0"),
        sampler.slice_seed(0, 5, "x"),
    }
    assert s not in others and len(others) == 3
