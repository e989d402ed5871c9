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


def _open_brats(make_napari_viewer, shared_data: Path, tmp_path: Path):
    src = nib.load(shared_data / BRATS)
    small = src.slicer[60:180:2, 50:190:2, 60:100]  # 60 x 70 x 40 voxels, still LPS
    path = tmp_path / "brats_flair.nii.gz"
    nib.save(small, path)
    viewer = make_napari_viewer()
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

    names = [output_name(layer.name, r) for r in ("pseudo", "anomaly", "mask")]
    assert [lay.name for lay in viewer.layers] == [layer.name, *names]
    pseudo, anomaly, mask = (viewer.layers[n] for n in names)
    for out in (pseudo, anomaly, mask):
        assert out.data.shape == layer.data.shape
        np.testing.assert_allclose(layer_affine(out), layer_affine(layer))
        np.testing.assert_allclose(out.scale, layer.scale)
        np.testing.assert_allclose(out.translate, layer.translate)
        assert out.units == layer.units and out.axis_labels == layer.axis_labels
    assert anomaly.colormap.name == "magma" and anomaly.blending == "additive"
    assert tuple(anomaly.contrast_limits) == (0.0, 1.0)
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
    }
    restored = np.zeros(layer.data.shape[2], dtype=bool)
    restored[[19, 20, 21]] = True
    assert np.all(np.abs(pseudo.data[:, :, restored]).reshape(-1, 3).max(axis=0) > 0)
    assert np.all(anomaly.data[:, :, restored].reshape(-1, 3).max(axis=0) > 0)
    assert not pseudo.data[:, :, ~restored].any() and not anomaly.data[:, :, ~restored].any()
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
    assert [id(viewer.layers[n]) for n in names] == before and len(viewer.layers) == 4
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


def test_threshold_suggestion_from_validation(
    make_napari_viewer, shared_data: Path, tmp_path: Path, qtbot, tiny_ensemble
) -> None:
    """The suggestion is the mean of the members' ``validation.best_threshold`` (what training
    records); keys no writer writes (``threshold``, ``validation.threshold``) are not read."""
    decoys = {"threshold": 0.9, "validation": {"threshold": 0.8}}
    ensemble = _with_info(
        tiny_ensemble,
        tmp_path / "ens",
        fold0={**decoys, "validation": {"threshold": 0.8, "best_threshold": 0.3}},
        fold1={**decoys, "validation": {"threshold": 0.8, "best_threshold": 0.4}},
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
    # members that record no best threshold give no validation suggestion
    assert widget.set_ensemble(_with_info(tiny_ensemble, tmp_path / "plain", fold0=decoys, fold1=decoys))
    assert widget.validation_threshold() is None


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
    # suggestion: 99th percentile over the calm slices (scores <= median: 10, 12)
    calm = outputs.anomaly.data[:, :, [10, 12]]
    assert widget.suggested == pytest.approx(np.percentile(calm[calm > 0], 99))
    qtbot.mouseClick(widget.suggest_button, Qt.MouseButton.LeftButton)
    assert widget.threshold() == pytest.approx(round(widget.suggested, 3))
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
    assert [lay.name for lay in viewer.layers] == ["brats2013_pat0006_flair", "brats2013_pat0006_lesion"]
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
