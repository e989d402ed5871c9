"""napari widgets in a real Qt: restore end to end, cancel, errors, threshold slider, `view`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import QPoint, Qt

from pseudohealthy.engine.record import RunRecord
from pseudohealthy.napari._layers import current_axial_index, layer_affine, layer_frame
from pseudohealthy.napari._outputs import ensure_outputs, output_name, record, run_record, set_record
from pseudohealthy.napari._restore_widget import RestoreWidget, member_text, slice_order
from pseudohealthy.napari._settings import WidgetSettings, load_settings, save_settings
from pseudohealthy.napari._threshold_widget import ThresholdWidget

BRATS = "lesion/brats2013/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"
pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def _isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSEUDOHEALTHY_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture(scope="module")
def tiny_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two untrained tiny members (32 px) with the metadata a trained ensemble carries."""
    import torch

    from pseudohealthy.model import checkpoint
    from pseudohealthy.model import network as model

    root = tmp_path_factory.mktemp("ensemble")
    cfg = model.get_preset("tiny")
    for fold in range(2):
        torch.manual_seed(fold)
        net = model.build_model(cfg)
        meta = {
            "modality": "FLAIR",
            "fold": fold,
            "train_tasks": ["poisson_intra", "sink", "intensity"],
            "validation": {"best_val_loss": 0.05 + fold / 100, "best_val_ap": 0.5 + fold / 10},
        }
        checkpoint.save_checkpoint(net, cfg, meta, root / f"fold{fold}")
    return root


def _open_brats(make_napari_viewer, shared_data: Path, tmp_path: Path, show: bool = False):
    src = nib.load(shared_data / BRATS)
    small = src.slicer[60:180:2, 50:190:2, 60:100]  # 60 x 70 x 40 voxels, still LPS
    path = tmp_path / "brats_flair.nii.gz"
    nib.save(small, path)
    viewer = make_napari_viewer(show=show)
    (layer,) = viewer.open(str(path), plugin="pseudohealthy")
    return viewer, layer


def _start(widget: RestoreWidget, qtbot, *, sampler: str, steps: int, mode: str, around: int = 0):
    widget.sampler_combo.setCurrentText(sampler)
    widget.steps_spin.setValue(steps)
    widget.device_combo.setCurrentText("cpu")
    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData(mode))
    widget.around_spin.setValue(around)
    qtbot.mouseClick(widget.restore_button, Qt.MouseButton.LeftButton)
    assert widget.worker is not None
    return widget.worker


def test_slice_order_puts_the_current_slice_first() -> None:
    assert slice_order("current", 5, 10) == [5]
    assert slice_order("around", 5, 10, around=2) == [5, 4, 6, 3, 7]
    assert slice_order("around", 0, 10, around=2) == [0, 1, 2]
    assert slice_order("range", 5, 10, first=8, last=2)[:3] == [5, 4, 6]
    assert sorted(slice_order("range", 5, 10, first=8, last=2)) == list(range(2, 9))
    assert slice_order("all", 9, 10)[0] == 9 and sorted(slice_order("all", 9, 10)) == list(range(10))


def test_settings_persist(tmp_path: Path) -> None:
    from pseudohealthy.engine.defaults import DEFAULT_SAMPLER, SAMPLERS, default_steps
    from pseudohealthy.napari import _settings

    # the engine's sampler names and defaults, not the widget's own
    assert _settings.SAMPLERS is SAMPLERS
    assert WidgetSettings().sampler == DEFAULT_SAMPLER
    assert WidgetSettings().steps == default_steps(DEFAULT_SAMPLER)
    path = tmp_path / "s.json"
    s = WidgetSettings(ensemble="/x", sampler="dpm", steps=7, device="cpu", slice_mode="all", around=3)
    save_settings(s, path)
    assert load_settings(path) == s
    path.write_text(json.dumps({"sampler": "bogus", "steps": -4, "unknown": 1}))
    loaded = load_settings(path)
    assert loaded.sampler == WidgetSettings().sampler and loaded.steps == 1
    path.write_text("{not json")
    assert load_settings(path) == WidgetSettings()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # no temporary file left


def test_member_list_shows_metadata(make_napari_viewer, tiny_ensemble: Path) -> None:
    viewer = make_napari_viewer()
    widget = RestoreWidget(viewer)
    assert widget.set_ensemble(tiny_ensemble)
    assert widget.member_list.count() == 2
    text = widget.member_list.item(1).text()
    assert "fold1" in text and "FLAIR" in text and "fold 1" in text and "val AP 0.6" in text
    assert "poisson_intra,sink,intensity" in text
    assert widget.checked_members() == ["fold0", "fold1"]
    widget.member_list.item(0).setCheckState(Qt.CheckState.Unchecked)
    assert widget.checked_members() == ["fold1"]
    assert member_text({"name": "m", "val_loss": 0.5}) == "m · val loss 0.5"
    assert member_text({"name": "m", "val_score": 0.7, "tasks": ["sink"]}) == "m"  # no writer writes these


def test_restore_end_to_end(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    source = np.array(layer.data, copy=True)
    widget = RestoreWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.layer_combo.currentText() == layer.name
    assert widget.set_ensemble(tiny_ensemble)
    frame = layer_frame(layer)
    k = 20
    viewer.dims.set_point(2, (frame.affine @ [0, 0, k, 1])[2])
    assert current_axial_index(viewer, layer, frame) == k
    worker = _start(widget, qtbot, sampler="ddim", steps=3, mode="around", around=1)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert not worker.is_running

    names = [output_name(layer.name, r) for r in ("pseudo", "anomaly", "mask", "uncertainty")]
    assert [lay.name for lay in viewer.layers] == [layer.name, *names]
    pseudo, anomaly, mask, spread = (viewer.layers[n] for n in names)
    for out in (pseudo, anomaly, mask, spread):
        assert out.data.shape == layer.data.shape
        np.testing.assert_allclose(layer_affine(out), layer_affine(layer))
        np.testing.assert_allclose(out.scale, layer.scale)
        np.testing.assert_allclose(out.translate, layer.translate)
        assert out.units == layer.units and out.axis_labels == layer.axis_labels
    assert anomaly.colormap.name == "magma" and anomaly.blending == "additive"
    assert mask.data.dtype == np.uint8

    rec = record(anomaly)
    assert rec["status"] == "done" and rec["requested_slices"] == [20, 19, 21]  # the slice on screen first
    run = RunRecord.from_dict(rec)
    assert run.restored == [19, 20, 21] and run.completed
    assert run.settings["sampler"] == "ddim" and run.settings["steps"] == 3 and run.settings["seed"] == 0
    assert run.member_names == ["fold0", "fold1"]
    assert len(rec["slice_scores"]) == 3 and rec["timings"]["total_s"] > 0
    assert rec["volume_score"] == pytest.approx(np.mean(list(run.slice_scores.values())))
    # the record is the run's RunRecord plus only the viewer's own keys
    assert set(rec) == set(run.to_dict()) | {
        "role",
        "source_layer",
        "status",
        "requested_slices",
        "ensemble_threshold",
        "ensemble_threshold_skipped",
    }
    restored = np.zeros(layer.data.shape[2], dtype=bool)
    restored[[19, 20, 21]] = True
    # colour limits from the map: 0 .. the 99.5th percentile of its restored foreground
    for out in (anomaly, spread):
        values = out.data[:, :, restored]
        hi = np.percentile(values[values > 0].astype(np.float64), 99.5)
        assert tuple(out.contrast_limits) == pytest.approx((0.0, hi), rel=1e-6)
        assert tuple(out.contrast_limits_range) == pytest.approx((0.0, hi), rel=1e-6)
    assert np.all(np.abs(pseudo.data[:, :, restored]).reshape(-1, 3).max(axis=0) > 0)
    assert np.all(anomaly.data[:, :, restored].reshape(-1, 3).max(axis=0) > 0)
    # unrestored slices: NaN (transparent) in the pseudo-healthy image, 0 in the maps
    assert np.isnan(pseudo.data[:, :, ~restored]).all() and not anomaly.data[:, :, ~restored].any()
    assert not np.isnan(pseudo.data[:, :, restored]).any()
    assert np.all(spread.data[:, :, restored].reshape(-1, 3).max(axis=0) > 0)  # members disagree
    assert not spread.data[:, :, ~restored].any() and set(rec["uncertainty_scores"]) == {"19", "20", "21"}
    assert anomaly.data.min() >= 0 and anomaly.data.max() <= 1
    np.testing.assert_array_equal(mask.data, anomaly.data > record(mask)["threshold"])
    # the pseudo-healthy slices are in the scan's intensity range, background where the scan has it
    lo, hi = source.min(), source.max()
    restored_vals = pseudo.data[:, :, restored]
    assert restored_vals.min() >= lo - 1e-3 * abs(lo) and restored_vals.max() <= hi + 1e-3 * abs(hi)
    np.testing.assert_array_equal(layer.data, source)  # the scan itself is untouched

    # a rerun with the same settings updates the same layers and keeps the earlier slices
    before = [id(viewer.layers[n]) for n in names]
    viewer.dims.set_point(2, (frame.affine @ [0, 0, 30, 1])[2])
    _start(widget, qtbot, sampler="ddim", steps=3, mode="current")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert [id(viewer.layers[n]) for n in names] == before and len(viewer.layers) == 5
    assert run_record(anomaly).restored == [19, 20, 21, 30]
    assert run_record(anomaly).slice_scores[20] == run.slice_scores[20]  # kept, not restored again
    assert anomaly.data[:, :, 30].max() > 0 and anomaly.data[:, :, 20].max() > 0
    # another seed is another run: the earlier slices go
    widget.seed_spin.setValue(1)
    _start(widget, qtbot, sampler="ddim", steps=3, mode="current")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert run_record(anomaly).restored == [30] and run_record(anomaly).settings["seed"] == 1
    assert not anomaly.data[:, :, 20].any() and anomaly.data[:, :, 30].max() > 0
    widget.seed_spin.setValue(0)
    # settings were saved for the next session
    saved = load_settings()
    assert saved.sampler == "ddim" and saved.steps == 3 and saved.slice_mode == "current"
    assert Path(saved.ensemble) == tiny_ensemble


def test_two_restores_read_the_weights_once(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble, monkeypatch
) -> None:
    """The widget keeps the listed ensemble: its members' networks load once, not on every click."""
    from pseudohealthy.model import checkpoint

    loads: list[str] = []
    original = checkpoint.load_checkpoint

    def counting(directory, device="cpu"):
        loads.append(Path(directory).name)
        return original(directory, device)

    monkeypatch.setattr(checkpoint, "load_checkpoint", counting)
    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = RestoreWidget(viewer)
    assert widget.set_ensemble(tiny_ensemble)
    anomaly_name = output_name(layer.name, "anomaly")
    for _ in range(2):
        _start(widget, qtbot, sampler="ddim", steps=2, mode="current")
        qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
        assert record(viewer.layers[anomaly_name])["status"] == "done"
    assert sorted(loads) == ["fold0", "fold1"]
    # one member only: the same member object with its network, nothing is read again
    widget.member_list.item(0).setCheckState(Qt.CheckState.Unchecked)
    assert widget.selected_ensemble().members == [widget.ensemble.members[1]]
    _start(widget, qtbot, sampler="ddim", steps=2, mode="current")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert run_record(viewer.layers[anomaly_name]).member_names == ["fold1"]
    assert sorted(loads) == ["fold0", "fold1"]
    # listing the same folder again keeps the ensemble; another folder is read afresh
    kept = widget.ensemble
    assert widget.set_ensemble(tiny_ensemble) and widget.ensemble is kept
    import shutil

    shutil.copytree(tiny_ensemble, tmp_path / "other")
    assert widget.set_ensemble(tmp_path / "other") and widget.ensemble is not kept


def _with_info(source: Path, target: Path, **changes: dict) -> Path:
    """A copy of the ensemble ``source`` with ``changes[member]`` merged into each member's JSON."""
    import shutil

    shutil.copytree(source, target)
    for name, change in changes.items():
        info_path = target / name / "pseudohealthy.json"
        info = json.loads(info_path.read_text())
        for key, value in change.items():
            info[key] = {**info[key], **value} if isinstance(value, dict) else value
        info_path.write_text(json.dumps(info))
    return target


def test_near_zero_validation_threshold_gives_way_to_the_map(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    """Members whose recorded best-Dice cut is near zero (the bundled demo's: about 2e-6) would
    flag the whole brain: once slices arrive the mask follows a rule computed on the map."""
    faithful = {"faithful_ssim": True, "best_threshold": 2e-6}
    ensemble = _with_info(
        tiny_ensemble, tmp_path / "ens", fold0={"validation": faithful}, fold1={"validation": faithful}
    )
    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = RestoreWidget(viewer)
    assert widget.set_ensemble(ensemble)
    _start(widget, qtbot, sampler="ddim", steps=2, mode="current")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    anomaly = viewer.layers[output_name(layer.name, "anomaly")]
    mask = viewer.layers[output_name(layer.name, "mask")]
    assert record(anomaly)["ensemble_threshold"] == pytest.approx(2e-6)
    assert record(mask)["threshold_rule"] in ("calm", "otsu")
    assert record(mask)["threshold"] > 1e-4
    restored = np.asarray(anomaly.data) > 0
    assert np.asarray(mask.data)[restored].mean() < 0.5  # not the whole brain


def test_threshold_suggestion_from_validation(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    """The suggestion is the mean of the members' ``validation.best_threshold`` (what training
    records) measured with the run's SSIM constants; keys no writer writes (``threshold``,
    ``validation.threshold``) are not read."""
    decoys = {"threshold": 0.9, "validation": {"threshold": 0.8}}
    faithful = {"threshold": 0.8, "faithful_ssim": True}
    ensemble = _with_info(
        tiny_ensemble,
        tmp_path / "ens",
        fold0={**decoys, "validation": {**faithful, "best_threshold": 0.3}},
        fold1={**decoys, "validation": {**faithful, "best_threshold": 0.4}},
    )
    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = RestoreWidget(viewer)
    threshold = ThresholdWidget(viewer)
    assert widget.set_ensemble(ensemble)
    _start(widget, qtbot, sampler="ddim", steps=2, mode="current")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    anomaly = viewer.layers[output_name(layer.name, "anomaly")]
    mask = viewer.layers[output_name(layer.name, "mask")]
    assert record(anomaly)["ensemble_threshold"] == pytest.approx(0.35)
    assert record(mask)["threshold"] == pytest.approx(0.35)  # the first mask uses the suggestion
    assert threshold.layer_combo.currentText() == anomaly.name
    assert (
        threshold.suggested == pytest.approx(0.35) and "ensemble validation" in threshold.suggest_label.text()
    )
    # the suggestion follows the checked members
    widget.member_list.item(1).setCheckState(Qt.CheckState.Unchecked)
    assert widget.validation_threshold() == pytest.approx(0.3)
    assert widget.validation_threshold(faithful_ssim=False) is None  # measured on other maps
    # members that record no best threshold give no validation suggestion
    assert widget.set_ensemble(_with_info(tiny_ensemble, tmp_path / "plain", fold0=decoys, fold1=decoys))
    assert widget.validation_threshold() is None
    # thresholds of unit-constant validation maps (no faithful_ssim recorded) are not used on the
    # run's reference-constant maps: the next rule applies and the rule text says why
    unit = {"validation": {"best_threshold": 0.3}}
    assert widget.set_ensemble(_with_info(tiny_ensemble, tmp_path / "unit", fold0=unit, fold1=unit))
    assert widget.validation_threshold() is None
    assert widget.validation_threshold(faithful_ssim=False) == pytest.approx(0.3)
    _start(widget, qtbot, sampler="ddim", steps=2, mode="current")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert (
        record(anomaly)["ensemble_threshold"] is None and record(anomaly)["ensemble_threshold_skipped"] == 2
    )
    assert record(mask)["threshold_rule"] != "validation"
    assert "2 member validation threshold(s) not used: other SSIM constants" in threshold.suggest_label.text()


def test_cancel_keeps_finished_slices(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    from pseudohealthy.engine.restore import SliceResult

    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = RestoreWidget(viewer)
    assert widget.set_ensemble(tiny_ensemble)
    worker = None
    seen: list[int] = []

    def on_yield(item) -> None:
        if isinstance(item, SliceResult):
            seen.append(int(item.index))
            if len(seen) == 1:
                qtbot.mouseClick(widget.cancel_button, Qt.MouseButton.LeftButton)

    widget.mode_combo.setCurrentIndex(widget.mode_combo.findData("all"))
    widget.sampler_combo.setCurrentText("ddpm")
    widget.steps_spin.setValue(12)
    widget.device_combo.setCurrentText("cpu")
    original = widget._on_yielded
    widget._on_yielded = lambda item: (original(item), on_yield(item))  # type: ignore[method-assign]
    worker = widget.restore()
    assert worker is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    anomaly = viewer.layers[output_name(layer.name, "anomaly")]
    rec = record(anomaly)
    assert rec["status"] == "cancelled"
    restored = run_record(anomaly).restored
    assert 1 <= len(restored) < layer.data.shape[2]
    assert restored == sorted(seen)
    for k in restored:
        assert anomaly.data[:, :, k].max() > 0
    others = np.setdiff1d(np.arange(layer.data.shape[2]), restored)
    assert not anomaly.data[:, :, others].any()
    # the viewer stays usable and another run works
    assert widget.restore_button.isEnabled() and not widget.cancel_button.isEnabled()
    viewer.dims.set_point(2, float(viewer.dims.range[2].start))
    viewer.add_points([[0, 0, 0]])
    _start(widget, qtbot, sampler="ddim", steps=2, mode="current")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert record(anomaly)["status"] == "done"


def test_errors_become_notifications(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble, monkeypatch
) -> None:
    import napari.utils.notifications as notifications

    shown: list[str] = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown.append(str(msg)))
    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = RestoreWidget(viewer)
    # a folder without checkpoints
    assert not widget.set_ensemble(tmp_path)
    assert shown and "no checkpoints" in shown[-1]
    # nothing to restore: an all-constant image
    assert widget.set_ensemble(tiny_ensemble)
    flat = viewer.add_image(np.zeros((8, 8, 4), dtype=np.float32), name="flat")
    widget.layer_combo.setCurrentText(flat.name)
    assert widget.restore() is None and "same value" in shown[-1]
    # a checkpoint that breaks after listing: the worker fails, the widget recovers
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(tiny_ensemble, broken)
    assert widget.set_ensemble(broken)
    (broken / "fold0" / "model.safetensors").write_bytes(b"garbage")
    widget.layer_combo.setCurrentText(layer.name)
    _start(widget, qtbot, sampler="ddim", steps=2, mode="current")
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert "Restoration failed" in shown[-1] and "fold0" in shown[-1]
    assert record(viewer.layers[output_name(layer.name, "anomaly")])["status"] == "failed"
    assert widget.restore_button.isEnabled()


def test_threshold_slider_updates_mask_and_plot_jumps(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot
) -> None:
    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    outputs = ensure_outputs(viewer, layer, (0.0, 1.0))
    rng = np.random.default_rng(0)
    slices, scores = [10, 11, 12, 25], [0.01, 0.02, 0.015, 0.2]
    for k, score in zip(slices, scores, strict=True):
        outputs.anomaly.data[:, :, k] = rng.random(layer.data.shape[:2]) * score * 4
    set_record(outputs.mask, threshold=0.5)
    run = RunRecord("ensemble", [], {}, "cpu", slice_scores=dict(zip(slices, scores, strict=True)))
    set_record(outputs.anomaly, **run.to_dict())
    widget = ThresholdWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert widget.layer_combo.currentText() == outputs.anomaly.name
    assert widget.threshold() == pytest.approx(0.5)
    # live update of the mask
    widget.slider.setValue(0.3)
    np.testing.assert_array_equal(outputs.mask.data, outputs.anomaly.data > 0.3)
    assert outputs.mask.data.any()
    widget.slider.setValue(0.05)
    np.testing.assert_array_equal(outputs.mask.data, outputs.anomaly.data > 0.05)
    assert record(outputs.mask)["threshold"] == pytest.approx(0.05)
    # suggestion: 99th percentile over the calm slices (scores at most half the highest: 10, 11, 12)
    calm = outputs.anomaly.data[:, :, [10, 11, 12]]
    assert widget.suggested == pytest.approx(np.percentile(calm[calm > 0], 99))
    qtbot.mouseClick(widget.suggest_button, Qt.MouseButton.LeftButton)
    assert widget.threshold() == pytest.approx(widget.suggested)
    np.testing.assert_array_equal(outputs.mask.data, outputs.anomaly.data > widget.threshold())
    # a threshold from the ensemble's validation metadata wins over the percentile
    set_record(outputs.anomaly, ensemble_threshold=0.42)
    assert widget.suggested == pytest.approx(0.42) and "ensemble" in widget.suggest_label.text()
    assert f"{np.mean(scores):.4f}" in widget.score_label.text() and "axial 25" in widget.score_label.text()
    # clicking on the plot at slice 25 shows that slice
    widget.canvas.draw()
    x, y = widget.axes.transData.transform((25, 0.1))
    ratio = widget.canvas.device_pixel_ratio
    pos = QPoint(round(x / ratio), round((widget.canvas.figure.bbox.height - y) / ratio))
    qtbot.mouseClick(widget.canvas, Qt.MouseButton.LeftButton, pos=pos)
    assert current_axial_index(viewer, layer, layer_frame(layer)) == 25


def test_slider_resolves_reference_constant_maps(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot
) -> None:
    """On a map with the reference's SSIM constants (values of order 1e-3) the slider spans the
    map's range finely enough to put a threshold between two map values 1e-4 apart."""
    from pseudohealthy.engine.maps import anomaly_map

    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    outputs = ensure_outputs(viewer, layer, (0.0, 1.0))
    image = np.asarray(layer.data[:, :, 20], dtype=np.float64)
    image = (image - image.min()) / (image.max() - image.min())
    restoration = image.copy()
    restoration[20:35, 25:40] *= 0.5  # a "lesion" the restoration removed
    amap = anomaly_map(restoration, image, image > 0, faithful=True)
    outputs.anomaly.data[:, :, 20] = amap
    run = RunRecord("ensemble", [], {}, "cpu", slice_scores={20: float(amap.mean())})
    set_record(outputs.anomaly, **run.to_dict())
    widget = ThresholdWidget(viewer)
    hi = np.percentile(amap[amap > 0].astype(np.float64), 99.5)
    assert hi < 0.05 and widget.slider.maximum() == pytest.approx(max(hi, widget.threshold()), rel=1e-6)
    assert widget.slider.singleStep() < 1e-4 / 2
    # two map values 1e-4 apart in the upper half of the range, and a threshold between them
    values = np.unique(amap[amap > 0.5 * hi])
    gaps = np.flatnonzero(np.diff(values) < 1e-4)
    a, b = values[gaps[0]], values[gaps[0] + 1]
    widget.set_threshold(float((a + b) / 2))
    np.testing.assert_array_equal(outputs.mask.data[:, :, 20], amap > (a + b) / 2)
    assert outputs.mask.data[:, :, 20].sum() == (amap >= b).sum()
    # the suggestion is applied as it is, not rounded to the slider's old 3 decimals
    assert widget.suggested is not None
    qtbot.mouseClick(widget.suggest_button, Qt.MouseButton.LeftButton)
    assert widget.threshold() == pytest.approx(widget.suggested, rel=1e-9)
    assert f"{widget.suggested:.4g}" in widget.suggest_label.text()


def test_view_command_opens_scan_with_widgets(
    make_napari_viewer, tiny_ensemble: Path, shared_data: Path
) -> None:
    from pseudohealthy.cli import build_parser
    from pseudohealthy.cli import view as view_cli
    from pseudohealthy.errors import ScanError

    args = build_parser().parse_args(["view", "scan.nii.gz", "--ensemble", str(tiny_ensemble)])
    assert args.func is view_cli.run and args.scan == Path("scan.nii.gz")
    with pytest.raises(ScanError, match="not found"):
        view_cli.open_viewer(Path("missing.nii.gz"), viewer=make_napari_viewer())
    from pseudohealthy.cli import main

    assert main(["view", "missing.nii.gz"]) == 2  # one-line error, no napari window
    viewer, restore, threshold = view_cli.open_viewer(None, tiny_ensemble, viewer=make_napari_viewer())
    assert [lay.name for lay in viewer.layers] == [
        "brats2013_pat0006_flair",
        "brats2013_pat0006_flair ground truth",
    ]
    assert viewer.layers[1].visible and viewer.layers[1].contour > 0  # the outline, shown
    assert restore.layer_combo.currentText() == "brats2013_pat0006_flair"
    assert restore.member_list.count() == 2 and restore.restore_button.isEnabled()
    assert tuple(viewer.dims.not_displayed) == (2,)  # axial slicing
    assert set(viewer.window.dock_widgets) >= {"Pseudo-healthy restoration", "Anomaly threshold"}
    assert isinstance(threshold, ThresholdWidget)


def test_widgets_open_from_the_plugin_menu(make_napari_viewer) -> None:
    viewer = make_napari_viewer()
    _, restore = viewer.window.add_plugin_dock_widget("pseudohealthy", "Pseudo-healthy restoration")
    _, threshold = viewer.window.add_plugin_dock_widget("pseudohealthy", "Anomaly threshold")
    assert isinstance(restore, RestoreWidget) and isinstance(threshold, ThresholdWidget)
    viewer.open_sample("pseudohealthy", "brats_flair")
    assert restore.layer_combo.currentText() == "brats2013_pat0006_flair"  # follows new layers
    assert tuple(viewer.dims.not_displayed) == (2,)  # NIfTI scans are shown axially


# ------------------------------------------------- issue 15: the viewer a reader keeps open
def _restore_now(widget: RestoreWidget, qtbot, mode: str = "current", around: int = 0) -> None:
    _start(widget, qtbot, sampler="ddim", steps=2, mode=mode, around=around)
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)


def _go(viewer, layer, k: int) -> None:
    frame = layer_frame(layer)
    from pseudohealthy.napari._layers import go_to_axial

    go_to_axial(viewer, layer, frame, k)


def test_unrestored_slices_show_the_scan(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    """No grey square: on a slice nothing restored, the canvas shows the scan as if the outputs
    were not there (the pseudo-healthy image is NaN = transparent there)."""
    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path, show=True)
    widget = RestoreWidget(viewer)
    assert widget.set_ensemble(tiny_ensemble)
    _go(viewer, layer, 20)
    _restore_now(widget, qtbot)
    pseudo = viewer.layers[output_name(layer.name, "pseudo")]
    assert pseudo.visible and pseudo.opacity == 1  # an opaque layer over the scan
    _go(viewer, layer, 10)  # not restored
    viewer.reset_view()
    with_outputs = viewer.screenshot(canvas_only=True, flash=False)
    for out in widget.outputs.all():
        out.visible = False
    scan_only = viewer.screenshot(canvas_only=True, flash=False)
    assert scan_only[..., :3].std() > 5  # the scan is on screen
    # the same picture (to rounding); an opaque 0 image (the old grey square) differs by far more
    assert np.abs(with_outputs.astype(int) - scan_only.astype(int)).max() <= 3
    for out in widget.outputs.all()[:1]:
        out.visible = True
    _go(viewer, layer, 20)  # restored: the pseudo-healthy image covers the scan
    assert not np.array_equal(viewer.screenshot(canvas_only=True, flash=False), scan_only)


def test_cancelled_rerun_keeps_every_finished_slice(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    from pseudohealthy.engine.restore import SliceResult

    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = RestoreWidget(viewer)
    threshold = ThresholdWidget(viewer)
    assert widget.set_ensemble(tiny_ensemble)
    _go(viewer, layer, 20)
    _start(widget, qtbot, sampler="ddpm", steps=12, mode="current")  # slow enough to cancel
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    anomaly = viewer.layers[output_name(layer.name, "anomaly")]
    first = run_record(anomaly)
    assert first.restored == [20]

    seen: list[int] = []
    original = widget._on_yielded

    def on_yield(item) -> None:
        original(item)
        if isinstance(item, SliceResult):
            seen.append(int(item.index))
            if len(seen) == 1:
                widget.cancel()

    widget._on_yielded = on_yield  # type: ignore[method-assign]
    _go(viewer, layer, 30)
    _start(widget, qtbot, sampler="ddpm", steps=12, mode="all")  # the same run: slice 20 is kept
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    rec = record(anomaly)
    assert rec["status"] == "cancelled", (seen, widget.status.text())
    run = run_record(anomaly)
    assert set(run.restored) == {20, *seen} and len(seen) >= 1
    assert run.slice_scores[20] == first.slice_scores[20]
    assert run.volume_score is not None and "volume score" in threshold.score_label.text()
    assert threshold.score_label.text() != "volume score: –"
    assert "in all" in widget.status.text() and "0 slice(s)" not in widget.status.text()
    # the score plot shows every restored slice of both runs
    assert any(len(line.get_xdata()) == len(run.restored) for line in threshold.axes.lines)


def test_threshold_rules() -> None:
    from pseudohealthy.napari._outputs import calm_slices, suggest_threshold

    rng = np.random.default_rng(0)
    amap = np.zeros((40, 40, 6), dtype=np.float32)
    for k in range(6):
        amap[:, :, k] = rng.uniform(0.05, 0.3, (40, 40))
        amap[10:20, 10:20, k] = rng.uniform(0.6, 0.9, (10, 10))  # a lesion on every slice
    slices, scores = [0, 1, 2, 3], [0.2, 0.21, 0.19, 0.2]
    assert calm_slices(slices, scores) == []  # alike: none is calm
    value, rule = suggest_threshold(amap, slices, scores)
    assert rule == "otsu" and 0.3 <= value <= 0.6  # between the tissue and the lesion
    assert suggest_threshold(amap, slices, scores, validation=0.4) == (0.4, "validation")
    # a near-zero validation cut flags the whole foreground: not used, Otsu instead
    assert suggest_threshold(amap, slices, scores, validation=2e-6) == (value, "otsu")
    assert suggest_threshold(amap, [], [], validation=2e-6) == (2e-6, "validation")  # nothing to check yet
    amap[10:20, 10:20, 4] = amap[0:10, 0:10, 4]  # slice 4 healthy, with a clearly lower score
    value, rule = suggest_threshold(amap, [0, 4], [0.2, 0.05])
    assert rule == "calm" and value == pytest.approx(np.percentile(amap[:, :, 4], 99))
    assert suggest_threshold(amap, [], []) == (None, "default")


def test_bundled_menu_offers_every_installed_ensemble(make_napari_viewer) -> None:
    """The ensemble row's "Bundled" menu lists the installed bundled ensembles with their
    members' modality; choosing one lists its members and shows its short name."""
    from pseudohealthy.data.sample import installed_ensembles

    widget = RestoreWidget(make_napari_viewer())
    actions = widget.bundled_button.menu().actions()
    names = ["demo", "demo-t1", "demo-sample", "demo-scratch", "demo-epsilon"]
    assert [a.data() for a in actions] == list(installed_ensembles()) == names
    texts = {a.data(): a.text() for a in actions}
    assert texts["demo"] == "demo (FLAIR)" and texts["demo-t1"] == "demo-t1 (T1)"
    actions[1].trigger()
    assert widget.ensemble_edit.text() == "demo-t1"
    assert widget.ensemble is not None and {m.modality for m in widget.ensemble.members} == {"T1"}
    assert widget.member_list.count() == len(widget.ensemble.members) >= 3
    actions[0].trigger()
    assert widget.ensemble_edit.text() == "demo"
    assert {m.modality for m in widget.ensemble.members} == {"FLAIR"}


def test_default_threshold_on_sample_tumour(make_napari_viewer, qtbot) -> None:
    """Demo ensemble on the sample's tumour slice: the automatic threshold says its rule and
    gives a usable mask (Dice against the ground truth)."""
    from pseudohealthy.cli import view as view_cli
    from pseudohealthy.data.sample import demo_ensemble_path
    from pseudohealthy.engine.defaults import DEFAULT_SAMPLER, default_steps

    assert demo_ensemble_path() is not None, "the demo ensemble is bundled in sample_data/"
    viewer, restore, threshold = view_cli.open_viewer(None, demo_ensemble_path(), viewer=make_napari_viewer())
    scan, truth = viewer.layers[0], viewer.layers[1]
    assert restore.ensemble_edit.text() == "demo"  # not the elided end of a long path
    k = int(np.argmax(np.asarray(truth.data).sum(axis=(0, 1))))
    _go(viewer, scan, k)
    # the viewer's own sampler and steps (the library's defaults: measured Dice 0.75 at DDIM 3; at
    # DDIM 10 these members keep more of the oedema in the restoration and the mask's Dice is 0.37)
    assert restore.sampler_combo.currentText() == DEFAULT_SAMPLER
    assert restore.steps_spin.value() == default_steps(DEFAULT_SAMPLER)
    restore.device_combo.setCurrentText("cpu")
    restore.mode_combo.setCurrentIndex(restore.mode_combo.findData("current"))
    assert restore.restore() is not None
    qtbot.waitUntil(lambda: restore.worker is None, timeout=300_000)
    mask = viewer.layers[output_name(scan.name, "mask")]
    rec = record(mask)
    assert rec["threshold_rule"] == "otsu" and "Otsu" in threshold.suggest_label.text()
    pred, gt = np.asarray(mask.data)[:, :, k] > 0, np.asarray(truth.data)[:, :, k] > 0
    dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
    print(f"Dice at the default threshold {rec['threshold']:.3f}: {dice:.3f}")
    assert dice > 0.5
    # names that say what a layer is; the ground-truth outline over the outputs, visible
    names = [lay.name for lay in viewer.layers]
    assert names[-1] == f"{scan.name} ground truth" and truth.visible
    assert f"{scan.name} predicted lesions" in names and f"{scan.name} uncertainty" in names
    assert not any(n.endswith("lesion mask") for n in names)


def test_dock_width_stable_and_empty_plot(make_napari_viewer, shared_data, tmp_path, qtbot) -> None:
    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = ThresholdWidget(viewer)
    assert list(widget.axes.get_xticks()) == [] and widget.axes.texts  # no -0.4..0.4 axis
    restore = RestoreWidget(viewer)
    width = max(widget.sizeHint().width(), widget.minimumSizeHint().width())
    rwidth = restore.minimumSizeHint().width()
    outputs = ensure_outputs(viewer, layer, (0.0, 1.0))
    slices = list(range(40))
    run = RunRecord("e" * 200, [], {}, "cpu", slice_scores={k: 0.1234567 + k for k in slices})
    set_record(outputs.anomaly, **run.to_dict())
    restore.status.setText("restored axial 12 " + "x" * 400)
    assert widget.score_label.text().startswith("volume score")
    assert max(widget.sizeHint().width(), widget.minimumSizeHint().width()) <= width
    assert restore.minimumSizeHint().width() <= rwidth
    assert widget.axes.get_xlim()[0] == -0.5 and widget.axes.get_xlim()[1] == layer.data.shape[2] - 0.5


def test_quiet_opengl_and_binary_mask_warning(
    make_napari_viewer, tiny_ensemble, qtbot, monkeypatch, caplog
) -> None:
    import logging

    import napari.utils.notifications as notifications

    from pseudohealthy.napari import quiet_opengl

    quiet_opengl()
    logger = logging.getLogger("OpenGL.acceleratesupport")
    with caplog.at_level(logging.INFO, logger="OpenGL.acceleratesupport"):
        logger.info("No OpenGL_accelerate module loaded: %s", "No module named 'OpenGL_accelerate'")
        logger.info("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]

    warned: list[str] = []
    monkeypatch.setattr(notifications, "show_warning", lambda msg: warned.append(str(msg)))
    viewer = make_napari_viewer()
    data = np.zeros((4, 32, 32), dtype=np.float32)
    data[:, 8:24, 8:24] = 1
    viewer.add_image(data, name="mask as scan")
    widget = RestoreWidget(viewer)
    assert widget.set_ensemble(tiny_ensemble)
    widget.device_combo.setCurrentText("cpu")
    widget.steps_spin.setValue(1)
    assert widget.restore() is not None
    qtbot.waitUntil(lambda: widget.worker is None, timeout=60_000)
    assert warned and "mask" in warned[0]


def test_view_without_qt_binding_says_what_to_install(monkeypatch, capsys) -> None:
    import sys
    import tomllib

    from pseudohealthy.cli import main

    monkeypatch.setitem(sys.modules, "qtpy", None)  # import qtpy fails as without PyQt/PySide
    assert main(["view"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PyQt6" in err[0] and "pseudohealthy[napari]" in err[0]
    extra = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert any(dep.startswith("PyQt6") for dep in extra["project"]["optional-dependencies"]["napari"])


def test_window_presets_linked_and_side_by_side(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    from pseudohealthy.figures.orientation import EDGE_LABELS

    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = RestoreWidget(viewer)
    assert widget.edge_labels.text() == EDGE_LABELS["axial"]  # R on the left: radiological
    viewer.dims.order = (1, 2, 0)  # coronal
    assert widget.edge_labels.text() == EDGE_LABELS["coronal"]
    viewer.dims.order = (0, 2, 1)  # sagittal
    assert widget.edge_labels.text() == EDGE_LABELS["sagittal"]
    viewer.dims.order = (2, 1, 0)
    assert widget.set_ensemble(tiny_ensemble)
    _go(viewer, layer, 20)
    _restore_now(widget, qtbot)
    pseudo = viewer.layers[output_name(layer.name, "pseudo")]
    anomaly = viewer.layers[output_name(layer.name, "anomaly")]
    spread = viewer.layers[output_name(layer.name, "uncertainty")]
    data = np.asarray(layer.data)
    values, counts = np.unique(data, return_counts=True)
    fg = data[data != values[np.argmax(counts)]]  # all but the background value

    assert widget.layer_combo.count() == 1  # outputs are not offered as scans
    widget.apply_window("1–99 %")
    lo, hi = np.percentile(fg, (1, 99))
    assert tuple(layer.contrast_limits) == pytest.approx((lo, hi), rel=1e-2)
    assert tuple(pseudo.contrast_limits) == tuple(layer.contrast_limits)
    widget.apply_window("scan limits")
    assert tuple(layer.contrast_limits) == pytest.approx((data.min(), data.max()))
    assert tuple(pseudo.contrast_limits) == tuple(layer.contrast_limits)
    layer.contrast_limits = (0.1, 0.9)  # linked both ways
    assert tuple(pseudo.contrast_limits) == pytest.approx((0.1, 0.9))
    pseudo.contrast_limits = (0.2, 0.8)
    assert tuple(layer.contrast_limits) == pytest.approx((0.2, 0.8))
    # side by side: one click, napari's grid with scan | pseudo-healthy | map; again: back
    assert not spread.visible
    qtbot.mouseClick(widget.grid_button, Qt.MouseButton.LeftButton)
    assert viewer.grid.enabled and tuple(viewer.grid.shape) == (1, 3)
    assert [lay.name for lay in viewer.layers if lay.visible] == [layer.name, pseudo.name, anomaly.name]
    qtbot.mouseClick(widget.grid_button, Qt.MouseButton.LeftButton)
    assert not viewer.grid.enabled and viewer.layers[output_name(layer.name, "mask")].visible
    # the uncertainty curve beside the score plot
    threshold = ThresholdWidget(viewer)
    assert threshold.spread_axes.lines and threshold.spread_axes.get_ylabel() == "uncertainty"


def test_saved_anomaly_map_opens_like_the_live_layer(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    """A map saved as <name>_anomaly.nii.gz opens (reader, `view`) with the live anomaly layer's
    colormap, blending and display range, not the scan's percentile contrast; a scan keeps it."""
    from pseudohealthy.cli import view as view_cli
    from pseudohealthy.evaluation.testsets import ANOMALY_SUFFIX
    from pseudohealthy.figures.ranges import display_range

    viewer, layer = _open_brats(make_napari_viewer, shared_data, tmp_path)
    widget = RestoreWidget(viewer)
    assert widget.set_ensemble(tiny_ensemble)
    _go(viewer, layer, 20)
    _restore_now(widget, qtbot, mode="around", around=1)
    live = viewer.layers[output_name(layer.name, "anomaly")]
    assert tuple(live.contrast_limits) != (0.0, 1.0)  # the map's own range
    path = tmp_path / f"{layer.name}{ANOMALY_SUFFIX}"
    viewer.layers.selection = {live}
    viewer.layers.save(str(path), selected=True, plugin="pseudohealthy")

    def same_as_live(opened) -> None:
        assert opened.colormap.name == live.colormap.name == "magma"
        assert (opened.blending, opened.opacity) == (live.blending, live.opacity)
        assert tuple(opened.contrast_limits) == pytest.approx(tuple(live.contrast_limits), rel=1e-6)
        assert tuple(opened.contrast_limits_range) == pytest.approx(
            tuple(live.contrast_limits_range), rel=1e-6
        )
        data = np.asarray(opened.data)
        assert tuple(opened.contrast_limits) == pytest.approx(display_range(data), rel=1e-6)

    (opened,) = viewer.open(str(path), plugin="pseudohealthy")
    same_as_live(opened)
    shown, _, _ = view_cli.open_viewer(path, viewer=make_napari_viewer())
    same_as_live(shown.layers[0])
    # one member's map (restore --member-maps) opens as a map too
    member_path = tmp_path / f"{layer.name}_anomaly_fold1.nii.gz"
    path.rename(member_path)
    (member,) = viewer.open(str(member_path), plugin="pseudohealthy")
    same_as_live(member)
    # the members' disagreement opens as the live uncertainty layer is drawn, with its own range
    spread = viewer.layers[output_name(layer.name, "uncertainty")]
    spread_path = tmp_path / f"{layer.name}_uncertainty.nii.gz"
    viewer.layers.selection = {spread}
    viewer.layers.save(str(spread_path), selected=True, plugin="pseudohealthy")
    (opened_spread,) = viewer.open(str(spread_path), plugin="pseudohealthy")
    assert opened_spread.colormap.name == spread.colormap.name == "cyan"
    assert (opened_spread.blending, opened_spread.opacity) == (spread.blending, spread.opacity)
    assert tuple(opened_spread.contrast_limits) == pytest.approx(
        display_range(np.asarray(opened_spread.data)), rel=1e-6
    )
    # a scan still opens grey, from its 0.5th to 99.5th percentile
    (scan,) = viewer.open(str(tmp_path / "brats_flair.nii.gz"), plugin="pseudohealthy")
    lo, hi = np.percentile(np.asarray(scan.data), [0.5, 99.5])
    assert scan.colormap.name == "gray"
    assert tuple(scan.contrast_limits) == pytest.approx((lo, hi))
