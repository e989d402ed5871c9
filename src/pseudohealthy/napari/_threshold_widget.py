"""Dock widget: threshold the anomaly map into the predicted lesions, browse per-slice scores and
the ensemble's per-slice uncertainty.

The slider spans the map's own display range (:func:`~pseudohealthy.napari._display.map_range`,
widened to hold the threshold in use) in :data:`SLIDER_TICKS` steps, so maps of order 1e-3 (the
reference's SSIM constants) are thresholded as finely as maps in [0, 1]."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledDoubleSlider

from pseudohealthy.engine.maps import format_score
from pseudohealthy.napari._display import map_range
from pseudohealthy.napari._layers import (
    Frame,
    canonical_view,
    current_axial_index,
    go_to_axial,
    layer_frame,
    show_axial,
)
from pseudohealthy.napari._outputs import (
    DEFAULT_THRESHOLD,
    find_output,
    record,
    rule_text,
    run_record,
    set_record,
    suggest_threshold,
    threshold_mask,
)

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels

_BG, _FG, _ACCENT, _SPREAD = "#262930", "#d1d2d4", "#f4a261", "#4cc9f0"
SLIDER_TICKS = 1000
"""Steps of the threshold slider across its range (one arrow key press moves one)."""


def slider_decimals(step: float) -> int:
    """Decimals the slider's label needs to show values ``step`` apart (at least 3)."""
    return max(3, int(np.ceil(-np.log10(step))) + 1) if step > 0 else 3


class ThresholdWidget(QWidget):
    """Slider on the anomaly map -> lesion mask (live), suggested threshold, per-slice score plot."""

    def __init__(self, napari_viewer: napari.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self._layer: Image | None = None
        self.suggested: float | None = None
        self.rule = "default"
        self._build()
        events = self.viewer.layers.events
        for event in (events.inserted, events.removed):
            event.connect(self._refresh_layers)
        self.viewer.dims.events.point.connect(self._update_cursor)
        self._refresh_layers()
        show_axial(self.viewer)

    def _build(self) -> None:
        self.layer_combo = QComboBox()
        self.layer_combo.currentIndexChanged.connect(self._select_layer)
        self.slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.set_slider_range(1.0)
        self.slider.setValue(DEFAULT_THRESHOLD)
        self.slider.valueChanged.connect(self.set_threshold)
        self.suggest_label = QLabel("suggested: –")
        self.suggest_label.setWordWrap(True)
        self.suggest_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.suggest_button = QPushButton("Suggested")
        self.suggest_button.setToolTip("set the threshold to the suggestion")
        self.suggest_button.clicked.connect(self.apply_suggestion)
        row = QHBoxLayout()
        row.addWidget(self.slider, 1)
        row.addWidget(self.suggest_button)
        self.score_label = QLabel("volume score: –")
        self.score_label.setWordWrap(True)
        # long text wraps instead of widening the dock
        self.score_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        form = QFormLayout()
        form.addRow("Anomaly map", self.layer_combo)
        form.addRow("Threshold", row)
        form.addRow(self.suggest_label)
        form.addRow(self.score_label)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        self._build_plot(layout)

    def _build_plot(self, layout: QVBoxLayout) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.2, 2.6), facecolor=_BG, layout="constrained")
        self.axes, self.spread_axes = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
        self.canvas = FigureCanvasQTAgg(fig)
        self.canvas.setMinimumHeight(200)
        self.canvas.setMinimumWidth(120)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Expanding)
        self.canvas.mpl_connect("button_press_event", self._on_click)
        layout.addWidget(self.canvas, 1)
        self._draw([], [], [], None)

    # ------------------------------------------------------------------ layers
    def anomaly_layers(self) -> list[Image]:
        return [lay for lay in self.viewer.layers if record(lay).get("role") == "anomaly"]

    def _refresh_layers(self, event: Any = None) -> None:
        current = self.layer_combo.currentText()
        names = [lay.name for lay in self.anomaly_layers()]
        inserted = getattr(event, "value", None)
        if inserted is not None and inserted.name in names:
            current = inserted.name
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._select_layer()

    def anomaly_layer(self) -> Image | None:
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def mask_layer(self) -> Labels | None:
        layer = self.anomaly_layer()
        if layer is None:
            return None
        return find_output(self.viewer, record(layer).get("source_layer", ""), "mask")

    def _select_layer(self, *_: Any) -> None:
        layer = self.anomaly_layer()
        if layer is self._layer:
            return
        if self._layer is not None:
            self._layer.events.metadata.disconnect(self.refresh)
        self._layer = layer
        if layer is not None:
            layer.events.metadata.connect(self.refresh)
            mask = self.mask_layer()
            threshold = record(mask).get("threshold") if mask is not None else None
            if threshold is not None:
                self._show_threshold(float(threshold))
        self.refresh()

    def _show_threshold(self, value: float) -> None:
        """Show ``value`` on the slider (widening its range when needed) without re-thresholding."""
        self.set_slider_range(self.slider.maximum(), value)

    def _frame(self) -> Frame | None:
        return layer_frame(self._layer) if self._layer is not None else None

    # ------------------------------------------------------------------ threshold
    def set_slider_range(self, hi: float, value: float | None = None) -> None:
        """The slider spans ``0 .. max(hi, value)`` in :data:`SLIDER_TICKS` steps and shows
        ``value`` (None: its current value); the mask is not re-thresholded."""
        value = float(self.slider.value()) if value is None else float(value)
        hi = max(float(hi), value)
        step = hi / SLIDER_TICKS
        self.slider.blockSignals(True)
        try:
            self.slider.setDecimals(slider_decimals(step))
            self.slider.setRange(0.0, hi)
            self.slider.setSingleStep(step)
            self.slider.setPageStep(step * 10)
            self.slider.setValue(value)
        finally:
            self.slider.blockSignals(False)

    def threshold(self) -> float:
        return float(self.slider.value())

    def set_threshold(self, value: float) -> None:
        """Recompute the lesion mask as ``anomaly map > value`` (live, whole volume)."""
        anomaly, mask = self.anomaly_layer(), self.mask_layer()
        if value > self.slider.maximum():
            self.set_slider_range(value)
        if self.slider.value() != value:
            self.slider.setValue(value)  # re-enters through valueChanged
            return
        if anomaly is None or mask is None or np.shape(mask.data) != np.shape(anomaly.data):
            return
        threshold_mask(np.asarray(anomaly.data), float(value), out=mask.data)
        mask.refresh()
        set_record(mask, threshold=float(value), threshold_rule=self._pending_rule)

    _pending_rule = "user"  # the rule recorded with the next threshold (a slider move: the user's)

    def apply_suggestion(self) -> None:
        if self.suggested is not None:
            self._pending_rule = self.rule
            try:
                self.set_threshold(self.suggested)
            finally:
                self._pending_rule = "user"

    # ------------------------------------------------------------------ scores and plot
    def refresh(self, event: Any = None) -> None:
        """Update the suggestion, the volume score and the plot from the anomaly layer's record
        (its :class:`~pseudohealthy.engine.record.RunRecord`)."""
        layer = self._layer
        rec = record(layer) if layer is not None else {}
        run = run_record(layer)
        slices = run.restored if run is not None else []
        scores = [run.slice_scores[k] for k in slices] if run is not None else []
        frame = self._frame()
        self.suggested, self.rule = None, "default"
        hi = 1.0
        if layer is not None and frame is not None:
            data = canonical_view(layer.data, frame)
            self.suggested, self.rule = suggest_threshold(data, slices, scores, rec.get("ensemble_threshold"))
            hi = map_range(data, slices)[1]
        self.suggest_label.setText(
            "suggested: –"
            if self.suggested is None
            else f"suggested: {self.suggested:.4g} "
            f"({rule_text(self.rule, int(rec.get('ensemble_threshold_skipped') or 0))})"
        )
        self.suggest_button.setEnabled(self.suggested is not None)
        mask = self.mask_layer()
        saved = record(mask).get("threshold") if mask is not None else None
        top = max(hi, self.suggested or 0.0)
        # a mask's threshold widens the range to hold it; with none, the slider stays inside the map's
        self.set_slider_range(top, float(saved) if saved is not None else min(self.threshold(), top))
        score = run.volume_score if run is not None else None
        if score is None:
            self.score_label.setText("volume score: –")
        else:
            top = int(np.argmax(scores))
            self.score_label.setText(
                f"volume score {format_score(score)} ({len(scores)} slices) · "
                f"max {format_score(scores[top])} at axial {slices[top]}"
            )
            self.score_label.setToolTip(
                "volume score: the mean of the restored slices' scores; the plot shows each slice's "
                "score (top) and the ensemble's disagreement on it (bottom)"
            )
        spreads = [run.uncertainty_scores.get(k, np.nan) for k in slices] if run is not None else []
        current = current_axial_index(self.viewer, layer, frame) if layer is not None and frame else None
        self._draw(slices, scores, spreads, current)

    def _draw(
        self, slices: list[int], scores: list[float], spreads: list[float], current: int | None
    ) -> None:
        frame = self._frame()
        n = frame.shape[2] if frame is not None else 0
        for ax, label in ((self.axes, "slice score"), (self.spread_axes, "uncertainty")):
            ax.clear()
            ax.set_facecolor(_BG)
            for spine in ax.spines.values():
                spine.set_color(_FG)
            ax.tick_params(colors=_FG, labelsize=7)
            ax.set_ylabel(label, color=_FG, fontsize=8)
            ax.set_ylim(0, 1e-3)
        self.spread_axes.set_xlabel("axial slice (click to go there)", color=_FG, fontsize=8)
        self.axes.set_xlim(-0.5, n - 0.5) if n else self.axes.set_xlim(0.0, 1.0)
        if not n:
            for ax in (self.axes, self.spread_axes):
                ax.set_xticks([])
                ax.set_yticks([])
            self.axes.text(
                0.5,
                0.5,
                "no restored scan yet",
                color=_FG,
                fontsize=8,
                ha="center",
                transform=self.axes.transAxes,
            )
        if slices:
            order = np.argsort(slices)
            xs, ys = np.asarray(slices)[order], np.asarray(scores)[order]
            self.axes.vlines(xs, 0, ys, color=_ACCENT, linewidth=1.5)
            self.axes.plot(xs, ys, "o", color=_ACCENT, markersize=3)
            self.axes.set_ylim(0, max(float(ys.max()) * 1.15, 1e-3))
            us = np.asarray(spreads, dtype=float)[order]
            if np.isfinite(us).any():
                self.spread_axes.plot(xs, us, "-o", color=_SPREAD, markersize=2.5, linewidth=1)
                self.spread_axes.set_ylim(0, max(float(np.nanmax(us)) * 1.15, 1e-3))
        where = current if current is not None else -10
        self._cursor = self.axes.axvline(where, color="#6ab0de", linewidth=1)
        self._spread_cursor = self.spread_axes.axvline(where, color="#6ab0de", linewidth=1)
        self.canvas.draw_idle()

    def _update_cursor(self, event: Any = None) -> None:
        layer, frame = self._layer, self._frame()
        if layer is None or frame is None:
            return
        k = current_axial_index(self.viewer, layer, frame)
        self._cursor.set_xdata([k, k])
        self._spread_cursor.set_xdata([k, k])
        self.canvas.draw_idle()

    def _on_click(self, event: Any) -> None:
        if event.inaxes not in (self.axes, self.spread_axes) or event.xdata is None:
            return
        self.go_to(round(event.xdata))

    def go_to(self, index: int) -> None:
        """Show canonical axial slice ``index`` in the viewer."""
        layer, frame = self._layer, self._frame()
        if layer is None or frame is None:
            return
        go_to_axial(self.viewer, layer, frame, int(np.clip(index, 0, frame.shape[2] - 1)))
