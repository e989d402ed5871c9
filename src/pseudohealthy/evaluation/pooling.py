"""Pooled benchmark metrics of anomaly maps vs lesion masks, in the evaluation frame.

Owns the pooling and the report: :class:`EvalEntry` (one volume's map, lesion, brain and image,
or its slices already scored in the model frame), :func:`evaluate_maps` (every entry into its
frame, the method and the intensity baseline arm pooled over all of them, and the restoration's
fidelity, :mod:`.fidelity`), and :func:`to_json`, :func:`format_table` and :func:`save_plots` for
the result. Which frame and rules is :mod:`.frame`; finding test cases on disk is
:mod:`.testsets`; turning a case into an entry (reusing or restoring its map) is :mod:`.cases`.

An entry with ``framed`` slices (the model frame, :func:`~pseudohealthy.evaluation.frame.frame_slices`)
is pooled as it is. Any other entry is in the scan's grid (the native frame): its axial slices
with enough foreground are squared and resized to ``size x size`` (128 by default); lesion masks
with linear interpolation, then > 0.4 (as the benchmark); anomaly maps (and the intensity
baseline) the same way. All slices and pixels of all volumes are pooled before any metric is
computed (:mod:`pseudohealthy.evaluation.metrics`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pseudohealthy.data.preprocess import SliceGeometry
from pseudohealthy.engine.maps import foreground_mean, slice_scores
from pseudohealthy.evaluation.fidelity import FIDELITY_KEYS, Fidelity
from pseudohealthy.evaluation.frame import (
    MASK_THRESHOLD,
    NATIVE_RULES,
    NATIVE_SIZE,
    FramedSlices,
    FrameRules,
    foreground_slices,
    to_frame,
)
from pseudohealthy.evaluation.metrics import (
    MAX_FPR,
    MetricsError,
    PixelPool,
    intensity_baseline_scores,
    metrics_from_pool,
    roc_curve,
)
from pseudohealthy.figures.plots import save_pr_curves, save_roc_curves, thin_curve

__all__ = [
    "BASELINE_KEY",
    "CURVE_POINTS",
    "FIDELITY_COLUMNS",
    "MASK_THRESHOLD",
    "METRIC_KEYS",
    "EvalEntry",
    "evaluate_maps",
    "foreground_slices",
    "format_fidelity",
    "format_table",
    "save_plots",
    "to_frame",
    "to_json",
]

log = logging.getLogger(__name__)

BASELINE_KEY = "intensity_baseline"
METRIC_KEYS = ("ap_image", "auroc", "ap_pixel", "best_dice", "dice_at_5fpr", "n_slices", "n_volumes")
CURVE_POINTS = 400


@dataclass
class EvalEntry:
    """One test volume in canonical space (X, Y, Z).

    ``anomaly``: the method's map (float, in [0, 1]); ``lesion``: ground truth (bool);
    ``foreground``: the brain (bool); ``image``: intensities for the intensity baseline (None:
    no baseline); ``indices``: axial slices to evaluate (None: :func:`foreground_slices`);
    ``normalised`` / ``restoration``: the model's input and the restoration in [0, 1], for the
    fidelity measures (None: not reported); ``framed``: the slices already in the model frame
    (then scored as they are; ``anomaly`` is only recorded).
    """

    name: str
    anomaly: np.ndarray
    lesion: np.ndarray
    foreground: np.ndarray
    image: np.ndarray | None = None
    indices: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    normalised: np.ndarray | None = None
    restoration: np.ndarray | None = None
    framed: FramedSlices | None = None

    def __post_init__(self) -> None:
        shape = np.shape(self.anomaly)
        if len(shape) != 3:
            raise ValueError(f"{self.name}: anomaly map must be 3D (X, Y, Z), got shape {shape}")
        for what in ("lesion", "foreground", "image", "normalised", "restoration"):
            arr = getattr(self, what)
            if arr is not None and np.shape(arr) != shape:
                raise ValueError(f"{self.name}: {what} shape {np.shape(arr)} differs from the map's {shape}")


def _native_slices(entry: EvalEntry, size: int, square: str, min_foreground: float) -> FramedSlices:
    """An entry in the scan's grid into the ``size`` frame (the native frame)."""
    geometry = SliceGeometry(tuple(entry.anomaly.shape[:2]), size, square)
    idx = foreground_slices(entry.foreground, min_foreground) if entry.indices is None else entry.indices
    idx = np.asarray(idx, dtype=int)

    def framed(volume: np.ndarray | None) -> np.ndarray | None:
        return None if volume is None else np.clip(to_frame(volume, idx, geometry), 0.0, 1.0)

    return FramedSlices(
        idx,
        geometry,
        framed(entry.anomaly),
        to_frame(entry.lesion, idx, geometry) > MASK_THRESHOLD,
        to_frame(entry.foreground, idx, geometry) > 0.5,
        framed(entry.normalised),
        framed(entry.restoration),
    )


class _Pooled:
    """Slice scores and pixels of one scoring method, pooled over volumes."""

    def __init__(self) -> None:
        self.pool = PixelPool()
        self.scores: list[np.ndarray] = []

    def add(self, maps: np.ndarray, labels: np.ndarray) -> np.ndarray:
        scores = slice_scores(maps)
        self.scores.append(scores)
        self.pool.update(maps, labels)
        return scores

    def result(self, slice_labels: np.ndarray, n_volumes: int) -> tuple[dict, dict]:
        scores = np.concatenate(self.scores)
        metrics = metrics_from_pool(
            scores, slice_labels, self.pool, n_volumes=n_volumes, allow_undefined=True
        )
        curve = self.pool.curve()
        precision, recall = curve.precision_recall()
        recall, precision = thin_curve(recall, precision, CURVE_POINTS)
        curves = {"pr_pixel": {"recall": _round(recall), "precision": _round(precision)}}
        if 0 < slice_labels.sum() < slice_labels.size:
            fpr, tpr = thin_curve(*roc_curve(scores, slice_labels), CURVE_POINTS)
            curves["roc_slice"] = {"fpr": _round(fpr), "tpr": _round(tpr)}
        if self.pool.n_clipped and not self.pool.exact:
            log.warning(
                "%d pixel scores outside [0, 1] were clipped for the pooled histogram", self.pool.n_clipped
            )
        return metrics, curves


def _round(arr: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in arr]


def _frame_record(rules: FrameRules | None, square: str, min_foreground: float, sizes: set[int]) -> dict:
    rules = rules or FrameRules("native", square, NATIVE_RULES.foreground, min_foreground)
    size = sorted(sizes)[0] if len(sizes) == 1 else sorted(sizes)
    return {**rules.to_dict(), "size": size, "max_fpr": MAX_FPR}


def _volume_record(entry: EvalEntry, framed: FramedSlices, scores: np.ndarray, fidelity: Fidelity) -> dict:
    idx = framed.indices
    return {
        "name": entry.name,
        **entry.info,
        "n_slices": int(idx.size),
        "n_lesion_slices": int(framed.lesion.any(axis=(1, 2)).sum()),
        "n_lesion_pixels": int(framed.lesion.sum()),
        "score": float(scores.mean()),
        "map_mean_in_brain": foreground_mean(entry.anomaly[:, :, idx], entry.foreground[:, :, idx]),
        "fidelity": fidelity.result(),
    }


def evaluate_maps(
    entries: Iterable[EvalEntry],
    *,
    size: int = NATIVE_SIZE,
    square: str = NATIVE_RULES.square,
    min_foreground: float = NATIVE_RULES.min_foreground,
    rules: FrameRules | None = None,
    invert_baseline: bool = False,
    progress: Callable[[Iterable[EvalEntry]], Iterable[EvalEntry]] | None = None,
    settings: dict | None = None,
) -> dict:
    """Evaluate anomaly maps against lesion masks, pooled over all ``entries`` (may be a generator).

    Entries with ``framed`` slices are pooled as they are; the others are brought into the
    native frame (``size``, ``square``, slices with ``min_foreground``). ``rules`` (the frame's
    :class:`~pseudohealthy.evaluation.frame.FrameRules`) is recorded under ``"frame"``.

    Returns a JSON-ready dict: the method's metrics at the top level (``ap_image, auroc,
    ap_pixel, best_dice, dice_at_5fpr, n_slices, n_volumes`` and extras), the intensity
    baseline's under ``"intensity_baseline"`` (when every entry has an ``image``), the pooled
    fidelity (:mod:`.fidelity`) under ``"fidelity"``, per-volume records under ``"volumes"``,
    ``settings`` (when given) under ``"settings"`` and thinned curves under ``"curves"``.
    Slice-level metrics are ``None`` when all slices (or none) contain lesion. Raises
    MetricsError without lesion pixels.
    """
    method, baseline = _Pooled(), _Pooled()
    labels: list[np.ndarray] = []
    volumes: list[dict] = []
    pooled_fidelity = Fidelity()
    sizes: set[int] = set()
    with_baseline = True
    for entry in progress(entries) if progress is not None else entries:
        framed = entry.framed or _native_slices(entry, size, square, min_foreground)
        if framed.indices.size == 0:
            log.warning("%s: no slice to evaluate (no foreground); skipped", entry.name)
            continue
        sizes.add(framed.geometry.size)
        labels.append(framed.lesion.any(axis=(1, 2)))
        scores = method.add(framed.maps, framed.lesion)
        fidelity = Fidelity().add(framed)
        pooled_fidelity.merge(fidelity)
        record = _volume_record(entry, framed, scores, fidelity)
        if entry.image is not None and with_baseline:
            base = intensity_baseline_scores(entry.image, entry.foreground, invert=invert_baseline)
            base = np.clip(to_frame(base, framed.indices, framed.geometry), 0.0, 1.0)
            record["baseline_score"] = float(baseline.add(base, framed.lesion).mean())
        else:
            with_baseline = False
        volumes.append(record)
    if not volumes:
        raise MetricsError("no volume had a slice to evaluate")
    slice_labels = np.concatenate(labels)
    result, curves = method.result(slice_labels, len(volumes))
    all_curves = {"method": curves}
    result["prevalence_pixel"] = result["n_lesion_pixels"] / result["n_pixels"]
    if with_baseline:
        base_metrics, all_curves[BASELINE_KEY] = baseline.result(slice_labels, len(volumes))
        base_metrics["invert"] = bool(invert_baseline)
        result[BASELINE_KEY] = base_metrics
    result["fidelity"] = pooled_fidelity.result()
    result["frame"] = _frame_record(rules, square, min_foreground, sizes)
    if settings is not None:
        result["settings"] = settings
    result["volumes"] = volumes
    result["curves"] = all_curves
    return result


def to_json(result: dict) -> str:
    """``result`` as indented JSON with lists of numbers kept on one line."""
    text = json.dumps(result, indent=1)
    return (
        re.sub(r"\[\s+([-+.\deE,\s]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"
    )


def _fmt(value: float | int | None, width: int) -> str:
    if value is None:
        return f"{'n/a':>{width}}"
    if isinstance(value, int):
        return f"{value:>{width}d}"
    return f"{value:>{width}.3f}"


def format_table(result: dict, method_name: str = "method") -> str:
    """A text table: one row for the method and one for the intensity baseline."""
    cols = [("AP_i", "ap_image"), ("AUROC", "auroc"), ("AP_p", "ap_pixel"), ("[Dsc]", "best_dice")]
    cols += [("Dice@5%FPR", "dice_at_5fpr"), ("n", "n_slices")]
    rows = [(method_name, result)]
    if BASELINE_KEY in result:
        rows.append(("intensity baseline", result[BASELINE_KEY]))
    name_w = max(len(r[0]) for r in rows) + 2
    widths = [max(len(c[0]), 6) + 2 for c in cols]
    lines = ["".ljust(name_w) + "".join(f"{c[0]:>{w}}" for c, w in zip(cols, widths, strict=True))]
    for name, metrics in rows:
        cells = "".join(_fmt(metrics.get(k), w) for (_, k), w in zip(cols, widths, strict=True))
        lines.append(name.ljust(name_w) + cells)
    lines.append(
        f"({result['n_volumes']} volumes, {result['n_slices']} slices, "
        f"{result['n_lesion_slices']} with lesion; pooled over the whole set)"
    )
    if "fidelity" in result:
        lines += ["", format_fidelity(result)]
    return "\n".join(lines)


FIDELITY_COLUMNS = tuple(
    zip(("SSIM", "PSNR dB", "bias", "map healthy", "map lesion", "ratio"), FIDELITY_KEYS, strict=True)
)


def format_fidelity(result: dict) -> str:
    """Fidelity per case and pooled: SSIM, PSNR and bias of the restoration in healthy brain, the map's
    mean there and inside the lesion, and their ratio (lesion / healthy)."""
    rows = [(v["name"], v.get("fidelity", {})) for v in result.get("volumes", [])]
    rows.append(("pooled", result["fidelity"]))
    name_w = max(len(r[0]) for r in rows) + 2
    widths = [max(len(c[0]), 6) + 2 for c in FIDELITY_COLUMNS]
    head = "fidelity (healthy brain = foreground - lesion)".ljust(name_w)
    lines = [
        head,
        "".ljust(name_w) + "".join(f"{c[0]:>{w}}" for c, w in zip(FIDELITY_COLUMNS, widths, strict=True)),
    ]
    for name, values in rows:
        cells = "".join(_fmt(values.get(k), w) for (_, k), w in zip(FIDELITY_COLUMNS, widths, strict=True))
        lines.append(name.ljust(name_w) + cells)
    return "\n".join(lines)


def save_plots(result: dict, out_dir: str | Path, method_name: str = "method") -> tuple[Path, Path]:
    """Write ``pr_curve.png`` (pixel level) and ``roc_curve.png`` (slice level) into ``out_dir``."""
    out_dir = Path(out_dir)
    pr, roc = {}, {}
    for key, label, metrics in _labelled(result, method_name):
        curves = result["curves"][key]
        pr[f"{label} (AP_p {metrics['ap_pixel']:.3f})"] = (
            curves["pr_pixel"]["recall"],
            curves["pr_pixel"]["precision"],
        )
        if "roc_slice" in curves:
            roc[f"{label} (AUROC {metrics['auroc']:.3f})"] = (
                curves["roc_slice"]["fpr"],
                curves["roc_slice"]["tpr"],
            )
    pr_path = save_pr_curves(out_dir / "pr_curve.png", pr, prevalence=result.get("prevalence_pixel"))
    title = "Slice-level ROC" if roc else "Slice-level ROC (undefined: one class only)"
    roc_path = save_roc_curves(out_dir / "roc_curve.png", roc, title=title)
    return pr_path, roc_path


def _labelled(result: dict, method_name: str) -> Iterator[tuple[str, str, dict]]:
    yield "method", method_name, result
    if BASELINE_KEY in result:
        yield BASELINE_KEY, "intensity baseline", result[BASELINE_KEY]
