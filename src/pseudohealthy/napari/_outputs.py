"""The output layers of a restoration and the metadata they carry.

"<name> pseudo-healthy" (grey, NaN = transparent where nothing is restored, so unrestored slices
show the scan), "<name> anomaly map" (magma, additive, over the scan), "<name> predicted lesions"
(Labels) and "<name> uncertainty" (the members' disagreement, additive, hidden until asked for)
share the source layer's data shape and geometry. Their metadata
keeps the source's NIfTI metadata (so the writer saves them in the source's geometry) plus a
``"pseudohealthy"`` record: the run's :meth:`RunRecord.to_dict() <pseudohealthy.engine.record.
RunRecord.to_dict>` (ensemble, members, settings, device, restored slices with their scores,
seeds and timings, volume score) plus only the viewer's own keys (:data:`VIEWER_KEYS`: role,
source layer, run status, requested slices, the threshold suggested by the ensemble's
validation (only members whose validation used the run's SSIM constants count, see
:func:`member_thresholds`) and, on the mask, its threshold and the rule that chose it). The maps'
colour limits and the threshold slider take their range from the map (``figures.ranges.
display_range``), never [0, 1]: maps with the reference's SSIM constants are of order 1e-3.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pseudohealthy.engine.record import RunRecord
from pseudohealthy.napari._display import anomaly_style, uncertainty_style
from pseudohealthy.napari._layers import NIFTI_KEY, geometry_kwargs

if TYPE_CHECKING:
    import napari
    from napari.layers import Image, Labels, Layer

    from pseudohealthy.model.checkpoint import Member

KEY = "pseudohealthy"
ROLES = ("pseudo", "anomaly", "mask", "uncertainty")
SUFFIXES = {
    "pseudo": "pseudo-healthy",
    "anomaly": "anomaly map",
    "mask": "predicted lesions",
    "uncertainty": "uncertainty",
}
GROUND_TRUTH = "ground truth"
#: the slider's start before any rule applies (nothing restored, no validation threshold)
DEFAULT_THRESHOLD = 0.5
VIEWER_KEYS = (
    "role",
    "source_layer",
    "status",
    "requested_slices",
    "ensemble_threshold",
    "ensemble_threshold_skipped",
    "threshold",
    "threshold_rule",
)
"""Keys of a layer record that belong to the viewer, not to the run (:class:`RunRecord`)."""
_INHERITED = (NIFTI_KEY, "source_path", "source_affine", "nifti_header")


def output_name(source_name: str, role: str) -> str:
    """``"<name> pseudo-healthy"``, ``"<name> anomaly map"``, ``"<name> predicted lesions"`` or
    ``"<name> uncertainty"``."""
    return f"{source_name} {SUFFIXES[role]}"


@dataclass
class OutputLayers:
    pseudo: Image
    anomaly: Image
    mask: Labels
    uncertainty: Image

    def all(self) -> tuple[Layer, Layer, Layer, Layer]:
        return (self.pseudo, self.anomaly, self.mask, self.uncertainty)


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
    """Reuse or add the output layers of ``source`` (just above it in the layer list).

    Existing layers keep their data (and records) when ``keep`` is true and their shape still
    fits; otherwise they are cleared.
    """
    shape = tuple(np.shape(source.data))
    base_meta = {k: v for k, v in (source.metadata or {}).items() if k in _INHERITED}
    geometry = geometry_kwargs(source)
    made = {}
    for role in ROLES:
        layer = find_output(viewer, source.name, role)
        if layer is not None and tuple(np.shape(layer.data)) != shape:
            viewer.layers.remove(layer)
            layer = None
        meta = {**base_meta, KEY: {"role": role, "source_layer": source.name}}
        if layer is None:
            name = output_name(source.name, role)
            layer = _add(viewer, role, name, empty(role, shape), meta, geometry, contrast)
        elif keep:
            meta[KEY] = {**record(layer), **meta[KEY]}
            for key, value in geometry.items():
                setattr(layer, key, value)
            layer.metadata = meta
        else:
            layer.data = empty(role, shape)
            for key, value in geometry.items():
                setattr(layer, key, value)
            layer.metadata = meta
            if role == "pseudo":
                layer.contrast_limits = contrast
        made[role] = layer
    _stack_above(viewer, source, [made[r] for r in ROLES])
    return OutputLayers(made["pseudo"], made["anomaly"], made["mask"], made["uncertainty"])


def empty(role: str, shape: tuple[int, ...]) -> np.ndarray:
    """An output before any slice is restored: NaN (transparent) for the pseudo-healthy image, so
    that the scan shows through, 0 for the others (additive maps and labels draw nothing at 0)."""
    if role == "mask":
        return np.zeros(shape, dtype=np.uint8)
    return np.full(shape, np.nan if role == "pseudo" else 0.0, dtype=np.float32)


def _stack_above(viewer: napari.Viewer, source: Layer, outputs: list[Layer]) -> None:
    """Outputs right above the source in drawing order; a ground-truth layer goes on top of them."""
    layers = viewer.layers
    target = layers.index(source) + 1
    for layer in outputs:
        index = layers.index(layer)
        if index != target:
            layers.move(index, target)
        target = layers.index(layer) + 1
    truth = ground_truth_layer(viewer, source.name)
    if truth is not None and layers.index(truth) < layers.index(outputs[-1]):
        layers.move(layers.index(truth), len(layers))


def ground_truth_name(source_name: str) -> str:
    """``"<name> ground truth"``: the lesion mask opened with a scan."""
    return f"{source_name} {GROUND_TRUTH}"


def ground_truth_layer(viewer: napari.Viewer, source_name: str) -> Layer | None:
    name = ground_truth_name(source_name)
    return viewer.layers[name] if name in viewer.layers else None


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
    if role == "uncertainty":
        return viewer.add_image(
            data,
            name=name,
            metadata=meta,
            contrast_limits=(0.0, 1.0),  # until slices arrive: then display_range of the map
            visible=False,
            **uncertainty_style(),
            **geometry,
        )
    if role == "pseudo":
        return viewer.add_image(
            data, name=name, metadata=meta, colormap="gray", contrast_limits=contrast, **geometry
        )
    return viewer.add_image(
        data,
        name=name,
        metadata=meta,
        contrast_limits=(0.0, 1.0),  # until slices arrive: then display_range of the map
        **anomaly_style(),
        **geometry,
    )


def threshold_mask(anomaly: np.ndarray, threshold: float, out: np.ndarray | None = None) -> np.ndarray:
    """Lesion mask ``anomaly > threshold`` as uint8 (written into ``out`` when given)."""
    mask = np.greater(anomaly, threshold)
    if out is None:
        return mask.astype(np.uint8)
    out[...] = mask
    return out


RULES = {
    "validation": "ensemble validation",
    "calm": "99th percentile, calm slices",
    "otsu": "Otsu on the square root, restored slices",
    "default": "default",
}
"""How a threshold was chosen (the key is recorded on the mask, the text shown in the widget)."""


def rule_text(rule: str, skipped: int = 0) -> str:
    """The widget's text for ``rule``, saying when members' validation thresholds were not used
    (``skipped`` of them, measured with other SSIM constants than the run's)."""
    text = RULES[rule]
    if skipped and rule != "validation":
        text += f"; {skipped} member validation threshold(s) not used: other SSIM constants"
    return text


def member_thresholds(members: Iterable[Member], faithful_ssim: bool) -> tuple[float | None, int]:
    """The mean of the members' validation thresholds (:attr:`Member.threshold`) measured with the
    run's SSIM constants (:attr:`Member.threshold_faithful_ssim` equal to ``faithful_ssim``), None
    when no member has one; and how many recorded thresholds were left out for other constants."""
    used, skipped = [], 0
    for member in members:
        if member.threshold is None:
            continue
        if member.threshold_faithful_ssim == bool(faithful_ssim):
            used.append(member.threshold)
        else:
            skipped += 1
    return (float(np.mean(used)) if used else None), skipped


def calm_slices(slices: list[int], scores: list[float]) -> list[int]:
    """Restored slices whose score is clearly below the others': at most half the highest score,
    and only when some slice scores above that (else every slice looks alike and none is calm)."""
    if len(slices) < 2:
        return []
    arr = np.asarray(scores, dtype=float)
    top = float(arr.max())
    if top <= 0:
        return []
    calm = [k for k, s in zip(slices, arr, strict=True) if s <= 0.5 * top]
    return calm if len(calm) < len(slices) else []


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (the cut maximising the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist).astype(float)
    total = weight[-1]
    mean = np.cumsum(hist * centres)
    w0, w1 = weight[:-1], total - weight[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        m0 = mean[:-1] / w0
        m1 = (mean[-1] - mean[:-1]) / w1
        between = w0 * w1 * (m0 - m1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(edges[1:-1][int(np.argmax(between))])


MAX_FLAGGED = 0.5
"""The largest share of the restored foreground a member validation threshold may flag."""


def _restored_values(anomaly_canonical: np.ndarray, slices: list[int]) -> np.ndarray:
    """The map's values inside the foreground (map > 0) of the restored ``slices``."""
    values = anomaly_canonical[:, :, sorted(slices)]
    return values[values > 0]


def _flagged_fraction(values: np.ndarray, threshold: float) -> float:
    """The share of ``values`` (:func:`_restored_values`) at or above ``threshold``; 0 for none."""
    return float(np.mean(values >= threshold)) if values.size else 0.0


def suggest_threshold(
    anomaly_canonical: np.ndarray,
    slices: list[int],
    scores: list[float],
    validation: float | None = None,
) -> tuple[float | None, str]:
    """The suggested threshold and its rule (a key of :data:`RULES`).

    1. ``validation``: the mean of the members' recorded best-Dice thresholds, when given;
    2. ``calm``: the 99th percentile of the map inside the foreground of the calm restored slices
       (:func:`calm_slices`; mostly healthy tissue, so their upper tail is the healthy range);
    3. ``otsu``: with no calm slice (every restored slice looks alike, e.g. all hold lesion),
       Otsu's threshold on the square root of the map inside the foreground of the restored
       slices (squared back), which adapts to the map's range: a map with the reference's SSIM
       constants is about a smoothed squared error, whose long tail draws plain Otsu too high
       (per-slice Dice on 9 tumour slices of dev patients 0003-0005, demo ensemble: 0.621 on the
       square root, 0.529 plain; data range 1 maps: 0.377 and 0.378).
    Returns ``(None, "default")`` before any slice is restored. A validation threshold that
    would flag more than :data:`MAX_FLAGGED` of the restored foreground is not used (members whose
    synthetic validation barely separates find their best Dice at a near-zero cut: the bundled
    demo members record about 2e-6, which marks the whole brain); the rules below take over.
    """
    restored = _restored_values(anomaly_canonical, slices)
    if validation is not None and _flagged_fraction(restored, validation) <= MAX_FLAGGED:
        return float(validation), "validation"
    if not slices:
        return None, "default"
    calm = calm_slices(slices, scores)
    if calm:
        values = _restored_values(anomaly_canonical, calm)
        if values.size:
            return float(np.percentile(values, 99)), "calm"
    if restored.size < 2 or float(restored.min()) == float(restored.max()):
        return None, "default"
    return otsu(np.sqrt(restored)) ** 2, "otsu"
