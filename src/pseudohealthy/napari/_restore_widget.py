"""Dock widget that restores slices of an image layer with an ensemble, in a worker thread.

No model logic lives here: the widget keeps the loaded :class:`~pseudohealthy.model.checkpoint.
Ensemble` (its members cache their networks, so weights are read once per folder and device),
turns its controls into a :class:`RestoreSettings`, runs :func:`pseudohealthy.engine.restore.
restore_iter` in a ``thread_worker`` generator and writes every finished slice into the output
layers on the GUI thread, growing the run's :class:`~pseudohealthy.engine.record.RunRecord`. The
display row (window/level presets shared by the scan and the pseudo-healthy image, side by side)
works through :mod:`pseudohealthy.napari._display`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from pseudohealthy.data.sample import bundled_name, demo_ensemble_path, installed_ensembles, resolve_ensemble
from pseudohealthy.engine.defaults import FAITHFUL_SSIM
from pseudohealthy.engine.maps import format_score
from pseudohealthy.engine.record import RunRecord
from pseudohealthy.errors import PseudohealthyError
from pseudohealthy.napari._display import (
    WINDOWS,
    EdgeLabels,
    SideBySide,
    apply_window,
    link_contrast,
    map_range,
    show_range,
    window_presets,
)
from pseudohealthy.napari._layers import (
    Frame,
    canonical_view,
    current_axial_index,
    layer_frame,
    layer_volume,
    show_axial,
)
from pseudohealthy.napari._outputs import (
    DEFAULT_THRESHOLD,
    RULES,
    OutputLayers,
    ensure_outputs,
    find_output,
    member_thresholds,
    output_name,
    record,
    run_record,
    set_record,
    set_run_record,
    suggest_threshold,
    threshold_mask,
)
from pseudohealthy.napari._settings import SAMPLERS, WidgetSettings, load_settings, save_settings

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

    from pseudohealthy.engine.restore import RestoreSettings
    from pseudohealthy.model.checkpoint import Ensemble

log = logging.getLogger(__name__)

MODES = {
    "current": "slice on screen",
    "around": "slice on screen ± N",
    "range": "slices from .. to",
    "all": "all slices",
}


def slice_order(
    mode: str, current: int, n_slices: int, *, around: int = 0, first: int = 0, last: int = 0
) -> list[int]:
    """Canonical axial indices to restore, the slice on screen first, then outwards from it."""
    if mode == "current":
        chosen = [current]
    elif mode == "around":
        chosen = list(range(current - around, current + around + 1))
    elif mode == "range":
        lo, hi = sorted((first, last))
        chosen = list(range(lo, hi + 1))
    elif mode == "all":
        chosen = list(range(n_slices))
    else:
        raise ValueError(f"unknown slice mode {mode!r}")
    chosen = [k for k in chosen if 0 <= k < n_slices]
    return sorted(set(chosen), key=lambda k: (abs(k - current), k))


def member_text(info: dict[str, Any]) -> str:
    """One line per ensemble member (a :meth:`Member.describe` dict): name, modality, fold,
    training tasks and validation AP (else loss)."""
    parts = [str(info.get("name", "?"))]
    if info.get("modality"):
        parts.append(str(info["modality"]))
    if info.get("fold") is not None:
        parts.append(f"fold {info['fold']}")
    tasks = info.get("train_tasks")
    if tasks:
        parts.append("tasks " + ",".join(str(t) for t in tasks))
    for key, label in (("val_ap", "val AP"), ("val_loss", "val loss")):
        if isinstance(info.get(key), int | float):
            parts.append(f"{label} {float(info[key]):.4g}")
            break
    return " · ".join(parts)


@dataclass
class Failed:
    """Yielded by the worker instead of raising, so errors become one notification."""

    error: BaseException


@dataclass
class ActiveRun:
    """The run in progress: its record, canonical views of the outputs and the viewer's extras."""

    record: RunRecord
    views: dict[str, np.ndarray]
    threshold: float
    suggested: float | None
    requested: list[int]
    skipped: int = 0  # members' validation thresholds left out (other SSIM constants than the run's)
    started: float = field(default_factory=time.perf_counter)
    new: int = 0  # slices restored by this run (the record may also hold kept ones)
    error: BaseException | None = None


def _restore_job(
    volume: Any, ensemble: Ensemble, settings: RestoreSettings, slices: list[int], stop: Any
) -> Iterator[Any]:
    """Generator run in the worker thread: restore the slices with the (already listed) ensemble;
    its members load their weights on first use and keep them."""
    from pseudohealthy.engine.restore import Progress, restore_iter

    try:
        yield Progress(0, len(slices), "preparing the scan and the ensemble")
        if stop.is_set():
            return
        yield from restore_iter(volume, ensemble, settings, slices=slices, should_stop=stop.is_set)
    except Exception as exc:  # reported on the GUI thread as a napari notification
        if not isinstance(exc, PseudohealthyError):
            log.exception("restoration failed")
        yield Failed(exc)


class RestoreWidget(QWidget):
    """Choose a scan layer and an ensemble, then restore slices to pseudo-healthy tissue."""

    run_finished = Signal()

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.settings = load_settings()
        self.worker: Any = None
        self.outputs: OutputLayers | None = None
        self._stop = threading.Event()
        self._run: ActiveRun | None = None
        self.ensemble: Ensemble | None = None  # the listed ensemble, loaded once per folder
        self._ensemble_path = ""  # the listed folder (resolved); the field may show a short name
        self.side_by_side = SideBySide(self.viewer)
        self.edge_labels = EdgeLabels(self.viewer)
        self._build()
        self._apply_settings()
        events = self.viewer.layers.events
        events.inserted.connect(self._on_layers_changed)
        events.removed.connect(self._refresh_layers)
        events.reordered.connect(self._refresh_layers)
        self.viewer.dims.events.point.connect(self._update_current_label)
        self._refresh_layers()
        show_axial(self.viewer)

    # ------------------------------------------------------------------ user interface
    def _build(self) -> None:
        self.layer_combo = QComboBox()
        self.layer_combo.currentIndexChanged.connect(self._update_current_label)
        self.ensemble_edit = QLineEdit()
        self.ensemble_edit.setPlaceholderText("folder of trained members")
        self.ensemble_edit.editingFinished.connect(self._ensemble_edited)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.bundled_button = self._bundled_menu()
        ens_row = QHBoxLayout()
        ens_row.addWidget(self.ensemble_edit, 1)
        ens_row.addWidget(self.bundled_button)
        ens_row.addWidget(browse)
        self.member_list = QListWidget()
        self.member_list.setMaximumHeight(80)
        self.member_list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.sampler_combo = QComboBox()
        self.sampler_combo.addItems(SAMPLERS)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1000)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.device_combo = QComboBox()
        self.device_combo.addItems(_devices())
        self.mode_combo = QComboBox()
        for key, text in MODES.items():
            self.mode_combo.addItem(text, key)
        self.mode_combo.currentIndexChanged.connect(self._update_mode)
        self.around_spin = QSpinBox()
        self.around_spin.setRange(0, 500)
        self.around_spin.setPrefix("± ")
        self.first_spin = QSpinBox()
        self.last_spin = QSpinBox()
        range_row = QHBoxLayout()
        range_row.addWidget(self.around_spin)
        range_row.addWidget(self.first_spin)
        range_row.addWidget(self.last_spin)
        self.current_label = QLabel()
        self.restore_button = QPushButton("Restore")
        self.restore_button.clicked.connect(self.restore)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.restore_button)
        buttons.addWidget(self.cancel_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        # long messages wrap instead of widening the dock
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.window_combo = QComboBox()
        self.window_combo.setToolTip("window/level of the scan and the pseudo-healthy image (linked)")
        self.window_combo.activated.connect(self._apply_window)
        self.grid_button = QPushButton("Side by side")
        self.grid_button.setCheckable(True)
        self.grid_button.setToolTip("scan | pseudo-healthy | anomaly map in napari's grid, one camera")
        self.grid_button.toggled.connect(self._toggle_grid)
        display_row = QHBoxLayout()
        display_row.addWidget(self.window_combo, 1)
        display_row.addWidget(self.grid_button)

        form = QFormLayout()
        form.addRow("Scan layer", self.layer_combo)
        form.addRow("Ensemble", ens_row)
        form.addRow("Members", self.member_list)
        form.addRow("Sampler", self.sampler_combo)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Seed", self.seed_spin)
        form.addRow("Device", self.device_combo)
        form.addRow("Slices", self.mode_combo)
        form.addRow("", range_row)
        form.addRow("", self.current_label)
        form.addRow("Window", display_row)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        self.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Maximum)

    def _apply_settings(self) -> None:
        s = self.settings
        self.sampler_combo.setCurrentText(s.sampler)
        self.steps_spin.setValue(s.steps)
        self.seed_spin.setValue(s.seed)
        if self.device_combo.findText(s.device) >= 0:
            self.device_combo.setCurrentText(s.device)
        self.mode_combo.setCurrentIndex(max(self.mode_combo.findData(s.slice_mode), 0))
        self.around_spin.setValue(s.around)
        path = s.ensemble if s.ensemble and Path(s.ensemble).is_dir() else demo_ensemble_path()
        if path is not None and s.ensemble and Path(path) != Path(s.ensemble):
            s.members = None
        if path is not None:
            self.set_ensemble(path, members=s.members if str(path) == s.ensemble else None)
        self._update_mode()

    def current_settings(self) -> WidgetSettings:
        """The controls as a :class:`WidgetSettings` (what is saved between sessions)."""
        checked = self.checked_members()
        n_members = len(self.ensemble) if self.ensemble is not None else 0
        return WidgetSettings(
            ensemble=self._ensemble_path or self.ensemble_edit.text().strip(),
            members=None if len(checked) == n_members else checked,
            sampler=self.sampler_combo.currentText(),
            steps=self.steps_spin.value(),
            device=self.device_combo.currentText(),
            slice_mode=self.mode_combo.currentData(),
            around=self.around_spin.value(),
            seed=self.seed_spin.value(),
        ).clean()

    def _ensemble_edited(self) -> None:
        text = self.ensemble_edit.text().strip()
        if text and text != _display_name(self._ensemble_path):
            self.set_ensemble(text)

    def _bundled_menu(self) -> QToolButton:
        """A button whose menu lists the installed bundled ensembles (``demo``, ``demo-t1``, ...),
        each with the modality of its members; choosing one lists its members."""
        button = QToolButton()
        button.setText("Bundled")
        button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        button.setToolTip("an ensemble that comes with pseudohealthy")
        menu = QMenu(button)
        for name, path in installed_ensembles().items():
            action = menu.addAction(f"{name} ({_modality_of(path)})")
            action.setData(name)
            action.triggered.connect(lambda _=False, n=name: self.set_ensemble(n))
        button.setMenu(menu)
        button.setEnabled(bool(menu.actions()))
        return button

    def _browse(self) -> None:
        start = self._ensemble_path or str(Path.home())
        path = QFileDialog.getExistingDirectory(self, "Ensemble folder", start)
        if path:
            self.set_ensemble(path)

    def _update_mode(self) -> None:
        mode = self.mode_combo.currentData()
        self.around_spin.setVisible(mode == "around")
        self.first_spin.setVisible(mode == "range")
        self.last_spin.setVisible(mode == "range")
        self._update_current_label()

    # ------------------------------------------------------------------ layers
    def image_layers(self) -> list[Image]:
        """Image layers the widget can restore (2D/3D greyscale, not our own outputs)."""
        from napari.layers import Image

        return [
            lay
            for lay in self.viewer.layers
            if isinstance(lay, Image)
            and lay.ndim in (2, 3)
            and not lay.rgb
            and record(lay).get("role") not in OUTPUT_ROLES
        ]

    def selected_layer(self) -> Image | None:
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        self._refresh_layers()
        if layer is not None and layer in self.image_layers() and not self.is_running():
            self.layer_combo.setCurrentText(layer.name)
        show_axial(self.viewer)
        self.edge_labels.update()

    def _refresh_layers(self, event: Any = None) -> None:
        current = self.layer_combo.currentText()
        names = [lay.name for lay in self.image_layers()]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._update_current_label()

    def _frame(self) -> Frame | None:
        layer = self.selected_layer()
        if layer is None:
            return None
        try:
            return layer_frame(layer)
        except PseudohealthyError:
            return None

    def _update_current_label(self, event: Any = None) -> None:
        layer, frame = self.selected_layer(), self._frame()
        self._update_windows(layer)
        if layer is None or frame is None:
            self.current_label.setText("no scan layer")
            self.restore_button.setEnabled(False)
            return
        n = frame.shape[2]
        for spin in (self.first_spin, self.last_spin):
            spin.setRange(0, n - 1)
        if self.last_spin.value() == 0:
            self.last_spin.setValue(n - 1)
        k = current_axial_index(self.viewer, layer, frame)
        self.current_label.setText(f"slice on screen: axial {k} of 0..{n - 1}")
        self.restore_button.setEnabled(not self.is_running())

    # ------------------------------------------------------------------ ensemble
    def set_ensemble(self, path: str | Path, members: list[str] | None = None) -> bool:
        """List the members of the ensemble folder ``path`` (checked: ``members``, default all).

        The :class:`Ensemble` is kept (:attr:`ensemble`) and read again only when the folder
        changes, so its members' networks, loaded on first use, serve every later run.
        """
        self.member_list.clear()
        try:
            path = resolve_ensemble(path)
            ensemble = self._load_ensemble(path)
        except (PseudohealthyError, OSError, ValueError) as exc:
            self._forget_ensemble()
            self.ensemble_edit.setText(str(path))
            self._ensemble_path = ""
            self._notify_error(f"Cannot use ensemble {path}: {exc}")
            return False
        self._ensemble_path = str(ensemble.path)
        self.ensemble_edit.setText(_display_name(ensemble.path))
        self.ensemble_edit.setToolTip(str(ensemble.path))
        self.ensemble_edit.setCursorPosition(len(self.ensemble_edit.text()))
        infos = ensemble.describe()
        for info in infos:
            item = QListWidgetItem(member_text(info))
            item.setToolTip(member_text(info).replace(" · ", "\n"))
            item.setData(Qt.ItemDataRole.UserRole, info["name"])
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            checked = members is None or info["name"] in members
            item.setCheckState(Qt.CheckState.Checked if checked else Qt.CheckState.Unchecked)
            self.member_list.addItem(item)
        self.status.setText(f"{len(infos)} member(s) in {Path(path).name}")
        return True

    def _load_ensemble(self, path: str | Path) -> Ensemble:
        """The kept ensemble when ``path`` is its folder, else the ensemble read from ``path``."""
        from pseudohealthy.model.checkpoint import Ensemble

        folder = Path(path).expanduser().resolve()
        if self.ensemble is not None and self.ensemble.path == folder:
            return self.ensemble
        ensemble = Ensemble.from_dir(folder)
        self._forget_ensemble()
        self.ensemble = ensemble
        return ensemble

    def _forget_ensemble(self) -> None:
        """Drop the kept ensemble and its cached networks (a running job keeps its own)."""
        if self.ensemble is not None:
            self.ensemble.release()
        self.ensemble = None

    def checked_members(self) -> list[str]:
        items = [self.member_list.item(i) for i in range(self.member_list.count())]
        return [it.data(Qt.ItemDataRole.UserRole) for it in items if it.checkState() == Qt.CheckState.Checked]

    def selected_ensemble(self) -> Ensemble | None:
        """The kept ensemble restricted to the checked members (sharing their loaded networks)."""
        names = self.checked_members()
        if self.ensemble is None or not names:
            return None
        return self.ensemble if names == self.ensemble.names else self.ensemble.select(names)

    def validation_threshold(
        self, ensemble: Ensemble | None = None, faithful_ssim: bool = FAITHFUL_SSIM
    ) -> float | None:
        """The mean of the members' validation thresholds measured with the SSIM constants
        ``faithful_ssim`` (:func:`member_thresholds`), None when no member records one;
        ``ensemble`` defaults to the checked members."""
        ensemble = ensemble if ensemble is not None else self.selected_ensemble()
        return member_thresholds(ensemble or [], faithful_ssim)[0]

    # ------------------------------------------------------------------ running
    def is_running(self) -> bool:
        return self.worker is not None

    def restore(self) -> Any:
        """Start restoring the chosen slices; returns the worker (None if nothing started)."""
        if self.is_running():
            return None
        layer = self.selected_layer()
        ensemble = self.selected_ensemble()
        if layer is None:
            self._notify_error("Choose an image layer to restore.")
            return None
        if ensemble is None:
            self._notify_error("Choose an ensemble folder and at least one member.")
            return None
        try:
            volume = layer_volume(layer)
            device = _resolved_device(self.device_combo.currentText())
        except PseudohealthyError as exc:
            self._notify_error(f"Cannot restore '{layer.name}': {exc}")
            return None
        if _looks_binary(layer.data):
            from napari.utils.notifications import show_warning

            show_warning(
                f"'{layer.name}' holds only two values: it looks like a mask, not a scan "
                "(restoring it anyway)"
            )
        ws = self.current_settings()
        save_settings(ws)
        current = current_axial_index(self.viewer, layer, volume)
        slices = slice_order(
            ws.slice_mode,
            current,
            volume.shape[2],
            around=ws.around,
            first=self.first_spin.value(),
            last=self.last_spin.value(),
        )
        from pseudohealthy.engine.restore import RestoreSettings

        settings = RestoreSettings(sampler=ws.sampler, steps=ws.steps, seed=ws.seed, device=device)
        self._prepare_outputs(layer, volume, ensemble, settings, slices)
        return self._launch(volume, ensemble, settings, slices)

    def _prepare_outputs(
        self, layer: Image, volume: Any, ensemble: Ensemble, settings: RestoreSettings, slices: list[int]
    ) -> None:
        """Add or reuse the output layers and start this run's :class:`RunRecord`.

        A rerun with the same ensemble, members, sampler, steps and seed keeps every slice restored
        before (:meth:`RunRecord.same_run`, :meth:`RunRecord.keep_from`; a slice restored again
        replaces its entry when it arrives), so a cancelled rerun loses nothing; any other change
        clears the outputs. A threshold the user chose stays; otherwise the mask follows the
        suggestion (:func:`suggest_threshold`) as slices arrive.
        """
        run = RunRecord.start(ensemble, settings.to_dict(), settings.device)
        keep = self._keep_previous(layer, run)
        mask_layer = find_output(self.viewer, layer.name, "mask")
        mask_rec = record(mask_layer) if mask_layer is not None else {}
        if not keep and mask_rec.get("threshold_rule", "user") != "user":
            mask_rec = {}  # an automatic threshold belongs to the run it was computed on
        suggested, skipped = member_thresholds(ensemble, settings.faithful_ssim)
        threshold, rule = mask_rec.get("threshold"), mask_rec.get("threshold_rule", "user")
        if threshold is None:
            threshold, rule = (
                (suggested, "validation") if suggested is not None else (DEFAULT_THRESHOLD, "default")
            )
        contrast = tuple(float(c) for c in layer.contrast_limits)
        self.outputs = ensure_outputs(self.viewer, layer, contrast, keep=keep)
        link_contrast(layer, self.outputs.pseudo)
        views = {
            r: canonical_view(out.data, volume)
            for r, out in zip(OUTPUT_ROLES, self.outputs.all(), strict=True)
        }
        self._run = ActiveRun(run, views, threshold, suggested, list(slices), skipped=skipped)
        set_record(self.outputs.mask, threshold=threshold, threshold_rule=rule)
        self._update_records(status="running")

    def _keep_previous(self, layer: Image, run: RunRecord) -> bool:
        """Take the slices of the layer's previous run into ``run`` when it is the same run (on a
        grid of the same shape); returns whether the outputs are kept."""
        previous_layer = find_output(self.viewer, layer.name, "anomaly")
        if previous_layer is None or np.shape(previous_layer.data) != np.shape(layer.data):
            return False
        previous = run_record(previous_layer)
        if previous is None or not run.same_run(previous):
            return False
        run.keep_from(previous)
        return True

    def _launch(self, volume: Any, ensemble: Ensemble, settings: RestoreSettings, slices: list[int]) -> Any:
        """Start the worker thread that drives ``restore_iter``."""
        from napari.qt.threading import thread_worker

        self._stop.clear()
        job = thread_worker(_restore_job, start_thread=False, ignore_errors=True)
        worker = job(volume, ensemble, settings, slices, self._stop)
        worker.yielded.connect(self._on_yielded)
        worker.errored.connect(self._on_error)  # only for failures outside the job's own handler
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self.progress.setRange(0, len(slices))
        self.progress.setValue(0)
        self.status.setText(f"restoring {len(slices)} slice(s), axial {slices[0]} first…")
        self.restore_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        worker.start()
        return worker

    def cancel(self) -> None:
        """Ask the running restoration to stop (within one denoising step); finished slices stay."""
        if self.is_running():
            self._stop.set()
            self.status.setText("cancelling…")
            self.cancel_button.setEnabled(False)

    def _on_yielded(self, item: Any) -> None:
        from pseudohealthy.engine.restore import Progress

        if isinstance(item, Failed):
            self._on_error(item.error)
            return
        if isinstance(item, Progress):  # counted in slice x denoising steps
            self.progress.setMaximum(max(item.total, 1))
            self.progress.setValue(min(item.done, item.total))
            if item.message:
                self.status.setText(item.message)
            return
        self._write_slice(item)

    def _write_slice(self, result: Any) -> None:
        """Write one finished SliceResult into the output layers and the run record (GUI thread)."""
        run, outputs = self._run, self.outputs
        if run is None or outputs is None:
            return
        k = int(result.index)
        views = run.views
        views["pseudo"][:, :, k] = _pseudo_intensity(result)
        views["anomaly"][:, :, k] = result.anomaly
        spread = getattr(result, "uncertainty", None)
        views["uncertainty"][:, :, k] = 0.0 if spread is None else spread
        run.record.add(result)
        run.new += 1
        restored = run.record.restored
        show_range(map_range(views["anomaly"], restored), outputs.anomaly)
        show_range(map_range(views["uncertainty"], restored), outputs.uncertainty)
        self._threshold_slice(k)
        for out in outputs.all():
            out.refresh()
        self._update_records(status="running")
        self.status.setText(f"restored axial {k} ({run.new} done, score {format_score(result.score)})")

    def _threshold_slice(self, k: int) -> None:
        """Threshold slice ``k`` into the mask; while no user threshold is set, the mask follows
        the suggestion over all restored slices (re-thresholding them when it moves; a member
        validation threshold too, which :func:`suggest_threshold` drops when it flags most of the
        restored brain)."""
        run, outputs = self._run, self.outputs
        assert run is not None and outputs is not None
        rec = record(outputs.mask)
        threshold = float(rec.get("threshold", run.threshold))
        if rec.get("threshold_rule", "user") in RULES:  # an automatic rule, not the user's
            slices = run.record.restored
            scores = [run.record.slice_scores[j] for j in slices]
            value, rule = suggest_threshold(run.views["anomaly"], slices, scores, run.suggested)
            if value is not None and (abs(value - threshold) > 1e-9 or rule != rec.get("threshold_rule")):
                threshold = value
                set_record(outputs.mask, threshold=threshold, threshold_rule=rule)
                for j in slices:
                    threshold_mask(run.views["anomaly"][:, :, j], threshold, out=run.views["mask"][:, :, j])
                return
        threshold_mask(run.views["anomaly"][:, :, k], threshold, out=run.views["mask"][:, :, k])

    def _update_records(self, status: str) -> None:
        """Write the run record (plus the viewer's keys) into the three output layers."""
        run, outputs = self._run, self.outputs
        if outputs is None or run is None:
            return
        run.record.timings["total_s"] = round(time.perf_counter() - run.started, 3)
        for out in outputs.all():
            set_run_record(
                out,
                run.record,
                status=status,
                requested_slices=run.requested,
                ensemble_threshold=run.suggested,
                ensemble_threshold_skipped=run.skipped,
            )

    def _on_error(self, exc: BaseException) -> None:
        if self._run is not None:
            self._run.error = exc
        self._notify_error(f"Restoration failed: {_explain(exc)}")

    def _on_finished(self) -> None:
        run = self._run
        stopped = self._stop.is_set()
        status = "failed" if run is not None and run.error is not None else "cancelled" if stopped else "done"
        if run is not None:
            run.record.completed = status == "done"
            self._update_records(status=status)
        n = run.new if run is not None else 0
        total = len(run.record.restored) if run is not None else 0
        seconds = time.perf_counter() - run.started if run is not None else 0.0
        kept = f", {total} in all" if total != n else ""
        self.status.setText(f"{status}: {n} slice(s) restored in {seconds:.1f} s{kept}")
        self.worker = None
        self.restore_button.setEnabled(self.selected_layer() is not None)
        self.cancel_button.setEnabled(False)
        self.run_finished.emit()

    # ------------------------------------------------------------------ display
    def _update_windows(self, layer: Image | None) -> None:
        """Offer the window/level presets (:data:`WINDOWS`) while there is a scan layer."""
        if self.window_combo.count() == 0:
            for name in WINDOWS:
                self.window_combo.addItem(name, name)
        self.window_combo.setEnabled(layer is not None)

    def _apply_window(self, *_: Any) -> None:
        """Apply the chosen preset, computed on the scan now, to the scan and its pseudo-healthy
        image (their contrast is linked, so later changes of either follow too)."""
        layer = self.selected_layer()
        name = self.window_combo.currentData()
        windows = window_presets(np.asarray(layer.data)) if layer is not None else {}
        if layer is None or name not in windows:
            return
        pseudo = find_output(self.viewer, layer.name, "pseudo")
        apply_window(windows[name], layer, pseudo)

    def apply_window(self, name: str) -> None:
        """Apply the window/level preset ``name`` (a key of :func:`window_presets`)."""
        index = self.window_combo.findData(name)
        if index < 0:
            raise KeyError(name)
        self.window_combo.setCurrentIndex(index)
        self._apply_window()

    def _toggle_grid(self, on: bool) -> None:
        layer = self.selected_layer()
        names = [output_name(layer.name, r) for r in ("pseudo", "anomaly")] if layer is not None else []
        shown = [layer] + [self.viewer.layers[n] for n in names if n in self.viewer.layers] if layer else []
        self.side_by_side.set(on, shown)
        self.edge_labels.update()

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        show_error(message)

    def closeEvent(self, event: Any) -> None:
        self._stop.set()
        super().closeEvent(event)


OUTPUT_ROLES = ("pseudo", "anomaly", "mask", "uncertainty")


def _display_name(path: str | Path) -> str:
    """What the ensemble field shows: a bundled ensemble's name (``demo``, ``demo-epsilon``), else
    the path with ``~`` for the home folder."""
    if not str(path):
        return ""
    name = bundled_name(path)
    if name is not None:
        return name
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if text.startswith(home + "/") else text


def _modality_of(path: Path) -> str:
    """The modality the members of an ensemble folder record, or ``"unknown"`` (the weights are
    not read: :meth:`Ensemble.from_dir` checks settings and headers only)."""
    from pseudohealthy.model.checkpoint import Ensemble

    try:
        found = {m.modality or "unknown" for m in Ensemble.from_dir(path).members}
    except (PseudohealthyError, OSError, ValueError):
        return "unknown"
    return "/".join(sorted(found)) or "unknown"


def _looks_binary(data: Any) -> bool:
    """Whether an image holds at most two distinct values (a mask opened as an image)."""
    arr = np.asarray(data)
    sample = arr.reshape(-1)[:: max(arr.size // 200_000, 1)]
    return np.unique(sample[np.isfinite(sample)]).size <= 2 and np.unique(arr).size <= 2


def _devices() -> list[str]:
    from pseudohealthy.device import available_devices

    return available_devices()


def _resolved_device(name: str) -> str:
    """The device a run on ``name`` uses ("auto" resolved once, here, for the run and its record)."""
    from pseudohealthy.device import resolve_device

    return str(resolve_device(name))


def _pseudo_intensity(result: Any) -> np.ndarray:
    """The restored slice in the scan's intensity units (the engine's ``pseudo_healthy``)."""
    pseudo = getattr(result, "pseudo_healthy", None)
    return np.asarray(result.restoration if pseudo is None else pseudo, dtype=np.float32)


def _explain(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "out of memory" in text.lower():
        return f"{text.splitlines()[0]} — try fewer members, a smaller batch or the CPU"
    return (
        text.splitlines()[0]
        if isinstance(exc, PseudohealthyError)
        else f"{type(exc).__name__}: {text.splitlines()[0]}"
    )
