"""The three output layers of a restoration and the metadata they carry.

"<name> pseudo-healthy" (grey), "<name> anomaly map" (magma, additive, over the scan) and
"<name> lesion mask" (Labels) share the source layer's data shape and geometry. Their metadata
keeps the source's NIfTI metadata (so the writer saves them in the source's geometry) plus a
``"pseudohealthy"`` record: the run's :meth:`RunRecord.to_dict() <pseudohealthy.engine.record.
RunRecord.to_dict>` (ensemble, members, settings, device, restored slices with their scores,
seeds and timings, volume score) plus only the viewer's own keys (:data:`VIEWER_KEYS`: role,
source layer, run status, requested slices, the threshold suggested by the ensemble's
validation and, on the mask, its threshold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pseudohealthy.engine.record import RunRecord
from pseudohealthy.napari._layers import NIFTI_KEY, geometry_kwargs

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Layer

KEY = "pseudohealthy"
ROLES = ("pseudo", "anomaly", "mask")
SUFFIXES = {"pseudo": "pseudo-healthy", "anomaly": "anomaly map", "mask": "lesion mask"}
DEFAULT_THRESHOLD = 0.25
VIEWER_KEYS = ("role", "source_layer", "status", "requested_slices", "ensemble_threshold", "threshold")
"""Keys of a layer record that belong to the viewer, not to the run (:class:`RunRecord`)."""
_INHERITED = (NIFTI_KEY, "source_path", "source_affine", "nifti_header")


def output_name(source_name: str, role: str) -> str:
    """``"<name> pseudo-healthy"``, ``"<name> anomaly map"`` or ``"<name> lesion mask"``."""
    return f"{source_name} {SUFFIXES[role]}"


@dataclass
class OutputLayers:
    pseudo: Image
    anomaly: Image
    mask: Labels

    def all(self) -> tuple[Layer, Layer, Layer]:
        return (self.pseudo, self.anomaly, self.mask)


def record(layer: Layer) -> dict[str, Any]:
    """The layer's ``"pseudohealthy"`` metadata record (empty dict when it has none)."""
    return dict((layer.metadata or {}).get(KEY) or {})


def set_record(layer: Layer, **changes: Any) -> None:
    """Update the layer's record; assigning metadata emits ``layer.events.metadata``."""
    meta = dict(layer.metadata or {})
    meta[KEY] = {**record(layer), **changes}
    layer.metadata = meta


def run_record(layer: Layer | None) -> RunRecord | None:
    """The run recorded on the layer (None when it records none)."""
    rec = record(layer) if layer is not None else {}
    return RunRecord.from_dict(rec) if "slice_scores" in rec else None


def set_run_record(layer: Layer, run: RunRecord, **viewer: Any) -> None:
    """Replace the layer's record by ``run.to_dict()`` plus the viewer's keys (kept or ``viewer``)."""
    unknown = sorted(set(viewer) - set(VIEWER_KEYS))
    if unknown:
        raise KeyError(f"not a viewer key of the record: {unknown[0]!r}")
    kept = {k: v for k, v in record(layer).items() if k in VIEWER_KEYS}
    meta = dict(layer.metadata or {})
    meta[KEY] = {**kept, **viewer, **run.to_dict()}
    layer.metadata = meta


def find_output(viewer: napari.Viewer, source_name: str, role: str) -> Layer | None:
    """The existing output layer of ``role`` for the source layer, if any."""
    name = output_name(source_name, role)
    return viewer.layers[name] if name in viewer.layers else None


def ensure_outputs(
    viewer: napari.Viewer, source: Image, contrast: tuple[float, float], *, keep: bool = False
) -> OutputLayers:
    """Reuse or add the three output layers of ``source``.

    Existing layers keep their data (and records) when ``keep`` is true and their shape still
    fits; otherwise they are cleared.
    """
    shape = tuple(np.shape(source.data))
    base_meta = {k: v for k, v in (source.metadata or {}).items() if k in _INHERITED}
    geometry = geometry_kwargs(source)
    made = {}
    for role in ROLES:
        layer = find_output(viewer, source.name, role)
        dtype = np.uint8 if role == "mask" else np.float32
        if layer is not None and tuple(np.shape(layer.data)) != shape:
            viewer.layers.remove(layer)
            layer = None
        meta = {**base_meta, KEY: {"role": role, "source_layer": source.name}}
        if layer is None:
            data = np.zeros(shape, dtype=dtype)
            layer = _add(viewer, role, output_name(source.name, role), data, meta, geometry, contrast)
        elif keep:
            meta[KEY] = {**record(layer), **meta[KEY]}
            for key, value in geometry.items():
                setattr(layer, key, value)
            layer.metadata = meta
        else:
            layer.data = np.zeros(shape, dtype=dtype)
            for key, value in geometry.items():
                setattr(layer, key, value)
            layer.metadata = meta
            if role == "pseudo":
                layer.contrast_limits = contrast
        made[role] = layer
    return OutputLayers(made["pseudo"], made["anomaly"], made["mask"])


def _add(
    viewer: napari.Viewer,
    role: str,
    name: str,
    data: np.ndarray,
    meta: dict[str, Any],
    geometry: dict[str, Any],
    contrast: tuple[float, float],
) -> Layer:
    if role == "mask":
        layer = viewer.add_labels(data, name=name, metadata=meta, opacity=0.5, **geometry)
        return layer
    if role == "pseudo":
        return viewer.add_image(
            data, name=name, metadata=meta, colormap="gray", contrast_limits=contrast, **geometry
        )
    return viewer.add_image(
        data,
        name=name,
        metadata=meta,
        colormap="magma",
        blending="additive",
        opacity=0.6,
        contrast_limits=(0.0, 1.0),
        **geometry,
    )


def threshold_mask(anomaly: np.ndarray, threshold: float, out: np.ndarray | None = None) -> np.ndarray:
    """Lesion mask ``anomaly > threshold`` as uint8 (written into ``out`` when given)."""
    mask = np.greater(anomaly, threshold)
    if out is None:
        return mask.astype(np.uint8)
    out[...] = mask
    return out


def suggest_threshold(anomaly_canonical: np.ndarray, slices: list[int], scores: list[float]) -> float | None:
    """The 99th percentile of the map inside the foreground of the calmest restored slices.

    "Calm" slices are those whose score is at most the median score of the restored slices:
    mostly healthy tissue, so their upper tail estimates the healthy range of the map.
    Returns None before any slice is restored.
    """
    if not slices:
        return None
    scores_arr = np.asarray(scores, dtype=float)
    calm = [k for k, s in zip(slices, scores_arr, strict=True) if s <= np.median(scores_arr)]
    values = anomaly_canonical[:, :, calm]
    values = values[values > 0]
    if values.size == 0:
        return None
    return float(np.percentile(values, 99))
