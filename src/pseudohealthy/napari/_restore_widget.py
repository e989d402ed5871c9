"""Dock widget that restores slices of an image layer with an ensemble, in a worker thread.

No model logic lives here: the widget turns its controls into a :class:`RestoreSettings`, runs
:func:`pseudohealthy.engine.restore.restore_iter` in a ``thread_worker`` generator and writes every
finished slice into the three output layers on the GUI thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from pseudohealthy.data.sample import demo_ensemble_path
from pseudohealthy.errors import PseudohealthyError
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
    OutputLayers,
    ensure_outputs,
    find_output,
    record,
    set_record,
    threshold_mask,
)
from pseudohealthy.napari._settings import SAMPLERS, WidgetSettings, load_settings, save_settings

if TYPE_CHECKING:
    import napari
    from napari.layers import Image

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
    """One line per ensemble member: name, modality, fold, tasks and validation score."""
    parts = [str(info.get("name", "?"))]
    if info.get("modality"):
        parts.append(str(info["modality"]))
    if info.get("fold") is not None:
        parts.append(f"fold {info['fold']}")
    tasks = info.get("tasks") or info.get("train_tasks")
    if tasks:
        parts.append("tasks " + ",".join(str(t) for t in tasks))
    for key, label in (("val_ap", "val AP"), ("val_score", "val score"), ("val_loss", "val loss")):
        if isinstance(info.get(key), int | float):
            parts.append(f"{label} {float(info[key]):.4g}")
            break
    return " · ".join(parts)


@dataclass
class Failed:
    """Yielded by the worker instead of raising, so errors become one notification."""

    error: BaseException


def _restore_job(
    volume: Any, ensemble_dir: str, members: list[str], settings: Any, slices: list[int], stop: Any
) -> Iterator[Any]:
    """Generator run in the worker thread: load the ensemble, then restore the slices."""
    from pseudohealthy.engine.restore import Progress, restore_iter
    from pseudohealthy.model.checkpoint import Ensemble

    try:
        yield Progress(0, len(slices), "loading the ensemble")
        ensemble = Ensemble.from_dir(ensemble_dir)
        if members and len(members) < len(ensemble.members):
            ensemble = ensemble.select(members)
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
        self._run: dict[str, Any] = {}
        self._members: list[dict[str, Any]] = []
        self._ensemble_path = ""
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
        ens_row = QHBoxLayout()
        ens_row.addWidget(self.ensemble_edit, 1)
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
        if path is not None:
            self.set_ensemble(path, members=s.members if str(path) == s.ensemble else None)
        self._update_mode()

    def current_settings(self) -> WidgetSettings:
        """The controls as a :class:`WidgetSettings` (what is saved between sessions)."""
        checked = self.checked_members()
        return WidgetSettings(
            ensemble=self.ensemble_edit.text().strip(),
            members=None if len(checked) == len(self._members) else checked,
            sampler=self.sampler_combo.currentText(),
            steps=self.steps_spin.value(),
            device=self.device_combo.currentText(),
            slice_mode=self.mode_combo.currentData(),
            around=self.around_spin.value(),
            seed=self.seed_spin.value(),
        ).clean()

    def _ensemble_edited(self) -> None:
        text = self.ensemble_edit.text().strip()
        if text and text != self._ensemble_path:
            self.set_ensemble(text)

    def _browse(self) -> None:
        start = self.ensemble_edit.text() or str(Path.home())
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
            and record(lay).get("role") not in ("pseudo", "anomaly")
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
        """List the members of the ensemble folder ``path`` (checked: ``members``, default all)."""
        from pseudohealthy.model.checkpoint import Ensemble

        self.ensemble_edit.setText(str(path))
        self._ensemble_path = str(path)
        self.member_list.clear()
        self._members = []
        try:
            ensemble = Ensemble.from_dir(path)
            infos = _describe(ensemble)
        except (PseudohealthyError, OSError, ValueError) as exc:
            self._notify_error(f"Cannot use ensemble {path}: {exc}")
            return False
        self._members = infos
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

    def checked_members(self) -> list[str]:
        items = [self.member_list.item(i) for i in range(self.member_list.count())]
        return [it.data(Qt.ItemDataRole.UserRole) for it in items if it.checkState() == Qt.CheckState.Checked]

    # ------------------------------------------------------------------ running
    def is_running(self) -> bool:
        return self.worker is not None

    def restore(self) -> Any:
        """Start restoring the chosen slices; returns the worker (None if nothing started)."""
        if self.is_running():
            return None
        layer = self.selected_layer()
        members = self.checked_members()
        if layer is None:
            self._notify_error("Choose an image layer to restore.")
            return None
        if not self._members or not members:
            self._notify_error("Choose an ensemble folder and at least one member.")
            return None
        try:
            volume = layer_volume(layer)
        except PseudohealthyError as exc:
            self._notify_error(f"Cannot restore '{layer.name}': {exc}")
            return None
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

        settings = RestoreSettings(sampler=ws.sampler, steps=ws.steps, seed=ws.seed, device=ws.device)
        self._prepare_outputs(layer, volume, ws, members, slices)
        return self._launch(volume, ws.ensemble, members, settings, slices)

    def _prepare_outputs(
        self, layer: Image, volume: Any, ws: WidgetSettings, members: list[str], slices: list[int]
    ) -> None:
        """Add or reuse the output layers and start this run's records.

        A rerun with the same ensemble, members, sampler, steps and seed keeps the slices restored
        before; any other change clears the outputs. The mask keeps the threshold it had.
        """
        run_key = {
            "ensemble": str(Path(ws.ensemble).resolve()),
            "members": members,
            "sampler": ws.sampler,
            "steps": ws.steps,
            "seed": ws.seed,
        }
        previous = find_output(self.viewer, layer.name, "anomaly")
        prev_rec = record(previous) if previous is not None else {}
        keep = bool(prev_rec) and all(prev_rec.get(key) == value for key, value in run_key.items())
        mask_layer = find_output(self.viewer, layer.name, "mask")
        threshold = record(mask_layer).get("threshold") if mask_layer is not None else None
        suggested = _ensemble_threshold(self._members)
        if threshold is None:
            threshold = DEFAULT_THRESHOLD if suggested is None else suggested
        contrast = tuple(float(c) for c in layer.contrast_limits)
        self.outputs = ensure_outputs(self.viewer, layer, contrast, keep=keep)
        done: dict[int, dict[str, Any]] = {}
        if keep:
            old = zip(
                prev_rec.get("slices", []),
                prev_rec.get("scores", []),
                prev_rec.get("seeds", []),
                strict=False,
            )
            done = {
                int(k): {"score": sc, "seed": sd, "seconds": None} for k, sc, sd in old if k not in slices
            }
        roles = ("pseudo", "anomaly", "mask")
        self._run = {
            "volume": volume,
            "views": {
                r: canonical_view(out.data, volume) for r, out in zip(roles, self.outputs.all(), strict=True)
            },
            "threshold": threshold,
            "done": done,
            "started": time.perf_counter(),
            "last": time.perf_counter(),
        }
        for out in self.outputs.all():
            set_record(
                out,
                **run_key,
                device=ws.device,
                requested_slices=slices,
                ensemble_threshold=suggested,
                status="running",
            )
        set_record(self.outputs.mask, threshold=threshold)
        self._update_records(status="running")

    def _launch(
        self, volume: Any, ensemble: str, members: list[str], settings: Any, slices: list[int]
    ) -> Any:
        """Start the worker thread that drives ``restore_iter``."""
        from napari.qt.threading import thread_worker

        self._stop.clear()
        job = thread_worker(_restore_job, start_thread=False, ignore_errors=True)
        worker = job(volume, ensemble, members, settings, slices, self._stop)
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
        """Write one finished SliceResult into the output layers (GUI thread)."""
        run, outputs = self._run, self.outputs
        if not run or outputs is None:
            return
        k = int(result.index)
        views = run["views"]
        views["pseudo"][:, :, k] = _pseudo_intensity(result)
        views["anomaly"][:, :, k] = result.anomaly
        threshold = record(outputs.mask).get("threshold", run["threshold"])
        threshold_mask(result.anomaly, threshold, out=views["mask"][:, :, k])
        now = time.perf_counter()
        run["done"].pop(k, None)
        run["done"][k] = {
            "score": float(result.score),
            "seed": [int(x) for x in getattr(result, "seeds", None) or []],
            "seconds": round(float(getattr(result, "seconds", 0.0)) or now - run["last"], 3),
        }
        run["last"] = now
        for out in outputs.all():
            out.refresh()
        self._update_records(status="running")
        n_new = sum(v["seconds"] is not None for v in run["done"].values())
        self.status.setText(f"restored axial {k} ({n_new} done, score {result.score:.4f})")

    def _update_records(self, **extra: Any) -> None:
        run, outputs = self._run, self.outputs
        if outputs is None or not run:
            return
        done = run["done"]
        fields = {
            "slices": list(done),
            "scores": [v["score"] for v in done.values()],
            "seeds": [v["seed"] for v in done.values()],
            "timings": {
                "total_s": round(time.perf_counter() - run["started"], 3),
                "per_slice_s": {k: v["seconds"] for k, v in done.items() if v["seconds"] is not None},
            },
            **extra,
        }
        for out in outputs.all():
            set_record(out, **fields)

    def _on_error(self, exc: BaseException) -> None:
        self._run["error"] = exc
        self._notify_error(f"Restoration failed: {_explain(exc)}")

    def _on_finished(self) -> None:
        run = self._run
        stopped = self._stop.is_set()
        status = "failed" if "error" in run else "cancelled" if stopped else "done"
        if run:
            self._update_records(status=status)
        n = sum(v["seconds"] is not None for v in run.get("done", {}).values())
        seconds = time.perf_counter() - run.get("started", time.perf_counter())
        self.status.setText(f"{status}: {n} slice(s) restored in {seconds:.1f} s")
        self.worker = None
        self.restore_button.setEnabled(self.selected_layer() is not None)
        self.cancel_button.setEnabled(False)
        self.run_finished.emit()

    def _notify_error(self, message: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(message)
        show_error(message)

    def closeEvent(self, event: Any) -> None:
        self._stop.set()
        super().closeEvent(event)


def _devices() -> list[str]:
    from pseudohealthy.device import available_devices

    return available_devices()


def _lookup(info: dict[str, Any], *keys: str) -> float | None:
    """The first number among dotted ``keys`` of a member's metadata."""
    for key in keys:
        value: Any = info
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _describe(ensemble: Any) -> list[dict[str, Any]]:
    """Per-member info dicts (name, modality, fold, tasks, validation scores, threshold)."""
    infos = []
    for member, desc in zip(ensemble.members, ensemble.describe(), strict=True):
        desc = dict(desc)
        desc["val_ap"] = _lookup(member.info, "validation.best_val_ap", "validation.val_ap")
        desc["threshold"] = _lookup(
            member.info, "threshold", "validation.threshold", "validation.best_threshold"
        )
        infos.append(desc)
    return infos


def _ensemble_threshold(members: list[dict[str, Any]]) -> float | None:
    """A threshold from the members' validation metadata (their mean), None when absent."""
    values = [m["threshold"] for m in members if isinstance(m.get("threshold"), float)]
    return float(np.mean(values)) if values else None


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
