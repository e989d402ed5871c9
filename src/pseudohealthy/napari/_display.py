"""How the canvas shows a scan: window/level presets, linked contrast, map ranges, side by side,
edge labels.

An anomaly map is drawn one way (:func:`anomaly_style`, limits from :func:`map_range`), and the
members' disagreement another (:func:`uncertainty_style`), whether restored live or opened from a
file (:func:`saved_map_range`).

The edge labels name the patient direction at each edge of the canvas (R/L, A/P, S/I) for the
displayed plane, from :data:`pseudohealthy.figures.orientation.EDGE_LABELS` when the camera shows
the plane in the project's convention (radiological; :func:`pseudohealthy.napari._layers.
show_axial`), else from the camera's actual orientation, so the canvas never mislabels a flip.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pseudohealthy.figures.orientation import EDGE_LABELS
from pseudohealthy.figures.ranges import display_range
from pseudohealthy.napari._layers import is_nifti_layer

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Layer

#: window/level presets: name -> percentiles of the scan's foreground (None: the scan's limits)
WINDOWS: dict[str, tuple[float, float] | None] = {
    "1–99 %": (1.0, 99.0),
    "0.5–99.5 %": (0.5, 99.5),
    "2–98 % (soft)": (2.0, 98.0),
    "scan limits": None,
}
MAP_SAMPLE = 1_000_000
"""At most this many voxels of a map (a regular stride) go into its display range."""
_PLANES = {2: "axial", 1: "coronal", 0: "sagittal"}  # RAS world axis off screen -> plane
_POSITIVE, _NEGATIVE = ("R", "A", "S"), ("L", "P", "I")
_EDGES = {"top": "top_center", "bottom": "bottom_center", "left": "middle_left", "right": "middle_right"}


def window_presets(data: np.ndarray) -> dict[str, tuple[float, float]]:
    """Contrast limits per preset: percentiles of the foreground of ``data`` (every voxel but the
    background value: the most common one, when it is the lowest or highest), plus the scan's
    own min..max."""
    arr = np.asarray(data, dtype=np.float32)
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return {}
    sample = finite[:: max(finite.size // 500_000, 1)]
    values, counts = np.unique(sample, return_counts=True)
    background = values[np.argmax(counts)]  # the most common value, when at an end of the range
    at_end = background in (values[0], values[-1]) and counts.max() > 1
    fg = sample[sample != background] if at_end else sample
    fg = fg if fg.size else sample
    out: dict[str, tuple[float, float]] = {}
    for name, pct in WINDOWS.items():
        lo, hi = (float(finite.min()), float(finite.max())) if pct is None else np.percentile(fg, pct)
        out[name] = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    return out


def apply_window(limits: tuple[float, float], *layers: Image | None) -> None:
    """Set the contrast limits (and a range that holds them) of every given layer."""
    lo, hi = (float(v) for v in limits)
    for layer in layers:
        if layer is None:
            continue
        rlo, rhi = layer.contrast_limits_range
        layer.contrast_limits_range = (min(rlo, lo), max(rhi, hi))
        layer.contrast_limits = (lo, hi)


def map_range(view: np.ndarray, slices: Sequence[int]) -> tuple[float, float]:
    """:func:`~pseudohealthy.figures.ranges.display_range` of the restored axial ``slices`` of a
    canonical map view (anomaly or uncertainty); ``(0, 1)`` before any slice is restored."""
    if not len(slices):
        return display_range(np.zeros(0, dtype=np.float32))
    values = np.asarray(view[:, :, sorted(slices)]).reshape(-1)
    return display_range(values[:: max(values.size // MAP_SAMPLE, 1)])


def anomaly_style() -> dict[str, Any]:
    """How an anomaly map layer is drawn, restored live or opened from a file: magma, additive,
    over the scan (its contrast limits: :func:`map_range`)."""
    return {"colormap": "magma", "blending": "additive", "opacity": 0.6}


def uncertainty_style() -> dict[str, Any]:
    """How the members' disagreement is drawn, restored live or opened from a file: cyan,
    additive (its contrast limits: :func:`map_range`)."""
    return {"colormap": "cyan", "blending": "additive", "opacity": 0.8}


def saved_map_range(view: np.ndarray) -> tuple[float, float]:
    """:func:`map_range` of a map read from a file (canonical view): its restored slices are the
    axial slices holding a positive value (0 elsewhere), so it opens as it was shown live."""
    arr = np.asarray(view)
    restored = np.flatnonzero((arr > 0).any(axis=(0, 1))) if arr.ndim == 3 else []
    return map_range(arr, [int(k) for k in restored])


def show_range(limits: tuple[float, float], *layers: Image | None) -> None:
    """Set both the contrast limits and their range of every given layer to ``limits`` (so the
    layer's own contrast slider spans the map's range too)."""
    lo, hi = (float(v) for v in limits)
    for layer in layers:
        if layer is not None:
            layer.contrast_limits_range = (lo, hi)
            layer.contrast_limits = (lo, hi)


_LINKED: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()


def link_contrast(a: Image, b: Image) -> None:
    """Keep the contrast limits of ``a`` and ``b`` equal: ``b`` takes ``a``'s now, and a change
    of either (slider, preset, auto-contrast) is copied to the other. Linking twice is a no-op."""
    if id(b) in _LINKED.get(a, set()):
        return
    _LINKED.setdefault(a, set()).add(id(b))
    _LINKED.setdefault(b, set()).add(id(a))
    busy = [False]
    ref_a, ref_b = weakref.ref(a), weakref.ref(b)

    def copy(src_ref: Any, dst_ref: Any) -> Any:
        def on_change(event: Any = None) -> None:
            src, dst = src_ref(), dst_ref()
            if busy[0] or src is None or dst is None:
                return
            busy[0] = True
            try:
                apply_window(tuple(src.contrast_limits), dst)
            finally:
                busy[0] = False

        return on_change

    a.events.contrast_limits.connect(copy(ref_a, ref_b))
    b.events.contrast_limits.connect(copy(ref_b, ref_a))
    apply_window(tuple(a.contrast_limits), b)


class SideBySide:
    """napari's grid with the given layers only (scan | pseudo-healthy | map), one shared camera;
    switching off restores the layers' visibility and the grid as they were."""

    def __init__(self, viewer: napari.Viewer) -> None:
        self.viewer = viewer
        self._saved: dict[str, bool] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.viewer.grid.enabled)

    def set(self, on: bool, layers: list[Layer]) -> None:
        viewer = self.viewer
        if on and layers:
            if self._saved is None:
                self._saved = {lay.name: lay.visible for lay in viewer.layers}
            keep = {id(lay) for lay in layers}
            for lay in viewer.layers:
                lay.visible = id(lay) in keep
            viewer.grid.stride = -1  # the bottom layer (the scan) in the first cell
            viewer.grid.shape = (1, len(layers))
            viewer.grid.enabled = True
            return
        viewer.grid.enabled = False
        for lay in viewer.layers:
            if self._saved is not None and lay.name in self._saved:
                lay.visible = self._saved[lay.name]
        self._saved = None


def edge_labels(viewer: napari.Viewer) -> dict[str, str] | None:
    """The patient direction at each canvas edge (top/bottom/left/right) for the displayed plane,
    or None when the view is not a 2D slice of RAS (NIfTI) layers."""
    layers = [lay for lay in viewer.layers if lay.ndim == 3]
    if viewer.dims.ndisplay != 2 or viewer.dims.ndim != 3 or not layers:
        return None
    if not all(is_nifti_layer(lay) for lay in layers):
        return None
    rows, cols = (int(a) for a in viewer.dims.displayed)
    (hidden,) = (int(a) for a in viewer.dims.not_displayed)
    camera = _camera(viewer)
    vertical, horizontal = (str(v) for v in camera.orientation2d)
    top = _POSITIVE[rows] if vertical == "up" else _NEGATIVE[rows]
    left = _POSITIVE[cols] if horizontal == "left" else _NEGATIVE[cols]
    opposite = dict(zip(_POSITIVE + _NEGATIVE, _NEGATIVE + _POSITIVE, strict=True))
    labels = {"top": top, "bottom": opposite[top], "left": left, "right": opposite[left]}
    conventional = EDGE_LABELS[_PLANES[hidden]]
    return dict(conventional) if labels == conventional else labels


class EdgeLabels:
    """Canvas text overlays with the patient direction at each edge, following the plane shown."""

    def __init__(self, viewer: napari.Viewer) -> None:
        from napari.components.overlays import TextOverlay

        self.viewer = viewer
        self.overlays = {}
        for edge, position in _EDGES.items():
            overlay = TextOverlay(text="", position=position, font_size=14, color="#f4d35e", visible=False)
            self.overlays[edge] = overlay
            viewer.canvas.overlays[f"pseudohealthy_edge_{edge}"] = overlay
        viewer.dims.events.order.connect(self.update)
        viewer.dims.events.ndisplay.connect(self.update)
        _camera(viewer).events.orientation2d.connect(self.update)
        self.update()

    def text(self) -> dict[str, str]:
        """The labels shown now (empty when hidden)."""
        return {edge: o.text for edge, o in self.overlays.items() if o.visible}

    def update(self, event: Any = None) -> None:
        labels = edge_labels(self.viewer)
        for edge, overlay in self.overlays.items():
            overlay.text = labels[edge] if labels else ""
            overlay.visible = labels is not None


def _camera(viewer: napari.Viewer) -> Any:
    scene = getattr(viewer, "scene", None)  # napari >= 0.9; older: viewer.camera
    return scene.camera if scene is not None else viewer.camera
