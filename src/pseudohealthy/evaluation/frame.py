"""The evaluation frame: where anomaly maps are scored and by which rules (the one owner).

:data:`FRAMES`:

- ``"model"`` (:data:`DEFAULT_FRAME`, the reference's): the ensemble's model-frame maps are scored
  as they are (the ensemble's image size); lesion masks are resized into that frame, then
  ``> 0.4``; the map is zeroed where the model-frame input is ``<= 0`` (``foreground="input"``,
  which keeps the one-pixel halo a resized brain mask drops); every axial slice of the volume is
  scored (``min_foreground=0``); slices are centre-cropped to a square (``square="crop"``).
- ``"native"`` (this project's earlier frame): maps go model frame -> the scan's grid (zeroed
  outside the brain there) -> a ``size x size`` frame (128 by default) before scoring; the model
  frame's foreground is the resized brain mask (``"mask"``); slices with under 1% brain are
  dropped; squares are padded. Maps read from disk (``restore``'s, in the scan's grid) can only
  be scored here.

:class:`FrameRules` holds one such choice (each rule can be changed alone, which is how
``benchmarks/bench_eval_frame.py`` measures the departures one at a time);
:func:`restore_frames` restores a scan once in the model frame (:class:`FrameRestoration`: input,
unmasked maps and restorations of every axial slice), from which :func:`frame_slices` scores any
rules without restoring again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from pseudohealthy.evaluation.choices import DEFAULT_FRAME, FRAMES, NATIVE_SIZE

if TYPE_CHECKING:  # nothing heavy at import: the command line reads FRAMES for its --help
    from pseudohealthy.data.preprocess import NormParams, SliceGeometry

__all__ = [
    "DEFAULT_FRAME",
    "FIDELITY_NORM",
    "FOREGROUNDS",
    "FRAMES",
    "MASK_THRESHOLD",
    "NATIVE_RULES",
    "NATIVE_SIZE",
    "REFERENCE_RULES",
    "FrameRestoration",
    "FrameRules",
    "FramedSlices",
    "evaluated_slices",
    "fidelity_affine",
    "fidelity_scale",
    "foreground_slices",
    "frame_slices",
    "resolve_rules",
    "restore_frames",
    "to_fidelity_scale",
    "to_frame",
]

FOREGROUNDS = ("input", "mask")
"""Model-frame foreground: ``input > 0`` (the reference, with its halo) or the resized brain mask."""
MASK_THRESHOLD = 0.4  # resized lesion masks: > 0.4 is lesion (as the benchmark)
FIDELITY_NORM = "max"
"""The intensity scale fidelity is measured in, whatever the members' normalisation: the
reference's (:func:`~pseudohealthy.data.preprocess.normalise`), so that members trained with
another normalisation are compared with the same yardstick (their restoration is mapped back to
the scan's units and into this scale; the input is this scale's, unclipped)."""


@dataclass(frozen=True)
class FrameRules:
    """How a volume is scored: ``frame`` (:data:`FRAMES`), ``square`` ("crop" or "pad"),
    ``foreground`` (:data:`FOREGROUNDS`) and ``min_foreground`` (slices with less brain than this
    fraction of the slice are dropped; 0 scores every axial slice)."""

    frame: str = DEFAULT_FRAME
    square: str = "crop"
    foreground: str = "input"
    min_foreground: float = 0.0

    def __post_init__(self) -> None:  # ``square`` is checked where it is used (SliceGeometry)
        for name, allowed in (("frame", FRAMES), ("foreground", FOREGROUNDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not 0.0 <= self.min_foreground:
            raise ValueError(f"min_foreground must be >= 0, got {self.min_foreground}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mask_threshold": MASK_THRESHOLD}


REFERENCE_RULES = FrameRules()
"""The reference's evaluation (REFERENCE.md, "Inference and maps" and "Benchmark metrics")."""
NATIVE_RULES = FrameRules("native", "pad", "mask", 0.01)
"""This project's earlier evaluation (still what ``evaluate --frame native`` does)."""


def resolve_rules(frame: str | None = None, square: str | None = None, *, reused: bool = False) -> FrameRules:
    """The rules of ``frame`` (None: :data:`DEFAULT_FRAME`, or ``"native"`` when maps are
    ``reused`` from disk), with ``square`` overriding the frame's own."""
    frame = frame or ("native" if reused else DEFAULT_FRAME)
    base = REFERENCE_RULES if frame == "model" else replace(NATIVE_RULES, frame=frame)
    return replace(base, square=square or base.square)


def foreground_slices(foreground: np.ndarray, min_foreground: float = 0.01) -> np.ndarray:
    """Axial indices whose foreground covers at least ``min_foreground`` of the slice (or pixels)."""
    fg = np.asarray(foreground, dtype=bool)
    n_pixels = fg.shape[0] * fg.shape[1]
    need = max(1, int(np.ceil(min_foreground * n_pixels))) if min_foreground < 1 else int(min_foreground)
    return np.flatnonzero(fg.sum(axis=(0, 1)) >= need)


def evaluated_slices(foreground: np.ndarray, rules: FrameRules) -> np.ndarray:
    """The axial slices ``rules`` score: all of them when ``min_foreground`` is 0."""
    if rules.min_foreground <= 0:
        return np.arange(np.shape(foreground)[2])
    return foreground_slices(foreground, rules.min_foreground)


def to_frame(volume: np.ndarray, indices: np.ndarray, geometry: SliceGeometry) -> np.ndarray:
    """Axial slices ``indices`` of a canonical volume into the frame, (N, size, size) float32."""
    stack = np.moveaxis(np.asarray(volume, dtype=np.float32)[:, :, indices], -1, 0)
    return geometry.to_model(stack, order=1).astype(np.float32, copy=False)


@dataclass
class FramedSlices:
    """One volume's evaluated slices in the evaluation frame, ``(N, S, S)`` each.

    ``maps`` the scored anomaly maps (0 outside ``foreground``), ``lesion`` the framed lesion
    mask, ``foreground`` the brain there; ``images`` / ``restorations`` the model's input and the
    member-mean restoration in [0, 1] (None when not known: maps read from disk).
    """

    indices: np.ndarray
    geometry: SliceGeometry
    maps: np.ndarray
    lesion: np.ndarray
    foreground: np.ndarray
    images: np.ndarray | None = None
    restorations: np.ndarray | None = None


@dataclass
class FrameRestoration:
    """A scan restored once in the model frame, every axial slice ``(Z, S, S)``.

    ``images``: the model's input in [0, 1]; ``masks``: the resized brain mask; ``maps``: the
    ensemble's 1 - SSIM maps before any foreground is applied (0 on slices not restored);
    ``restorations``: the member mean; ``restored``: the axial slices restored (those asked for
    whose input is not all 0); ``foreground`` / ``normalised``: the brain and the model's
    intensity scaling in the scan's grid ``(X, Y, Z)``; ``fidelity_images`` /
    ``fidelity_restorations``: input and restoration in the :data:`FIDELITY_NORM` scale (None:
    the model's own, ``images`` and ``restorations``).
    """

    geometry: SliceGeometry
    images: np.ndarray
    masks: np.ndarray
    maps: np.ndarray
    restorations: np.ndarray
    restored: np.ndarray
    foreground: np.ndarray
    normalised: np.ndarray
    fidelity_images: np.ndarray | None = None
    fidelity_restorations: np.ndarray | None = None

    def frame_foreground(self, rule: str) -> np.ndarray:
        """``(Z, S, S)`` bool: ``input > 0`` (``"input"``) or the resized brain mask (``"mask"``)."""
        if rule not in FOREGROUNDS:
            raise ValueError(f"foreground must be one of {', '.join(FOREGROUNDS)}, got {rule!r}")
        return self.images > 0 if rule == "input" else np.asarray(self.masks, dtype=bool)

    def _native(self, stack: np.ndarray) -> np.ndarray:
        out = np.zeros(self.foreground.shape, dtype=np.float32)
        k = self.restored
        if k.size:
            back = np.clip(self.geometry.from_model(stack[k]), 0.0, 1.0)
            out[:, :, k] = np.moveaxis(back, 0, -1) * self.foreground[:, :, k]
        return out

    def native_map(self, rule: str = "mask") -> np.ndarray:
        """The map in the scan's grid (as ``restore`` writes it): foreground ``rule`` applied in
        the model frame, resized back, 0 outside the brain and on slices not restored."""
        return self._native(np.where(self.frame_foreground(rule), self.maps, 0.0))

    def native_restoration(self) -> np.ndarray:
        """The member-mean restoration in the scan's grid, [0, 1], 0 outside the brain."""
        return self._native(self.restorations)


def frame_slices(restored: FrameRestoration, lesion: np.ndarray, rules: FrameRules, indices) -> FramedSlices:
    """Score ``restored`` in the model frame by ``rules`` (``rules.frame`` must be "model").

    The map is zeroed outside the ``rules.foreground`` of each slice; the lesion is resized into
    the frame and thresholded at :data:`MASK_THRESHOLD`.
    """
    if rules.frame != "model":
        raise ValueError("frame_slices scores the model frame; the native frame goes through the scan's grid")
    if rules.square != restored.geometry.square:
        raise ValueError(f"restored with square={restored.geometry.square!r}, scored with {rules.square!r}")
    idx = np.asarray(indices, dtype=int)
    fg = restored.frame_foreground(rules.foreground)[idx]
    images, rest = restored.images, restored.restorations
    if restored.fidelity_images is not None and restored.fidelity_restorations is not None:
        images, rest = restored.fidelity_images, restored.fidelity_restorations
    return FramedSlices(
        idx,
        restored.geometry,
        np.where(fg, np.clip(restored.maps[idx], 0.0, 1.0), 0.0).astype(np.float32),
        to_frame(lesion, idx, restored.geometry) > MASK_THRESHOLD,
        fg,
        images[idx],
        rest[idx],
    )


def _model_images(geometry: SliceGeometry, normalised: np.ndarray) -> np.ndarray:
    """Every axial slice of a normalised ``(X, Y, Z)`` volume in the model frame, in [0, 1]."""
    return np.clip(geometry.to_model(np.moveaxis(normalised, -1, 0)), 0.0, 1.0).astype(np.float32)


def _model_stack(prepared) -> tuple[np.ndarray, np.ndarray]:
    """Every axial slice of a prepared scan in its model frame: (images, brain masks)."""
    geo = prepared.geometry
    return _model_images(geo, prepared.normalised), geo.to_model(np.moveaxis(prepared.foreground, -1, 0))


def fidelity_affine(prepared) -> tuple[float, float, NormParams] | None:
    """``(scale, shift, reference)``: ``scale * x + shift`` takes the prepared scan's normalised
    values into the :data:`FIDELITY_NORM` scale ``reference``; None when that is its own."""
    from pseudohealthy.data.preprocess import norm_params

    own = prepared.norm
    if own.method == FIDELITY_NORM:
        return None
    ref = norm_params(prepared.volume.data, prepared.foreground, FIDELITY_NORM)
    width = ref.hi - ref.lo  # own [0, 1] -> scan units -> the reference's [0, 1]
    return (own.hi - own.lo) / width, (own.lo - ref.lo) / width, ref


def fidelity_scale(prepared, restorations: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Every axial slice's input and ``restorations`` (model frame, the prepared scan's own
    normalisation) in the :data:`FIDELITY_NORM` scale; None when that is the scan's own."""
    affine = fidelity_affine(prepared)
    if affine is None:
        return None
    images = _model_images(prepared.geometry, affine[2].apply(prepared.volume.data, prepared.foreground))
    return images, to_fidelity_scale(restorations, affine)


def to_fidelity_scale(values: np.ndarray, affine: tuple[float, float, NormParams] | None) -> np.ndarray:
    """``values`` in a prepared scan's own normalisation mapped by :func:`fidelity_affine`'s
    ``affine`` into the :data:`FIDELITY_NORM` scale, clipped to [0, 1] (unchanged when None)."""
    if affine is None:
        return values
    scale, shift, _ = affine
    return np.clip(np.asarray(values, dtype=np.float64) * scale + shift, 0.0, 1.0).astype(np.float32)


def restore_frames(
    volume,
    ensemble,
    settings,
    *,
    slices: Iterable[int] | None = None,
    brain_mask: np.ndarray | None = None,
    models: list | None = None,
) -> FrameRestoration:
    """Restore ``slices`` (default every axial slice) of ``volume`` in the ensemble's model frame.

    Preprocessing is the engine's (:func:`~pseudohealthy.engine.restore.prepare_for`: the
    ensemble's size and normalisation, ``settings.square``); slices whose model-frame input is
    all 0 are not restored (their map is 0 under any foreground rule). The networks run through
    :func:`~pseudohealthy.engine.frame.restore_frame_steps` with the engine's per-slice seeds, so a
    slice restores as in ``restore``, batched as there (a CUDA out-of-memory halves the batch:
    :func:`~pseudohealthy.engine.restore.halving_batches`); the maps are kept unmasked, for
    :func:`frame_slices`.
    ``models``: the members' networks already on ``settings.device`` (None: loaded here).
    """
    from pseudohealthy.device import resolve_device
    from pseudohealthy.engine.frame import FrameResult, compiled, default_batch_size, restore_frame_steps
    from pseudohealthy.engine.restore import halving_batches, prepare_for

    settings = settings.validate()
    prepared = prepare_for(volume, ensemble, settings, brain_mask)
    images, masks = _model_stack(prepared)
    n_z = images.shape[0]
    wanted = range(n_z) if slices is None else sorted({int(k) for k in slices})
    todo = [k for k in wanted if 0 <= k < n_z and images[k].any()]
    maps = np.zeros_like(images)
    rest = np.zeros_like(images)
    if todo:
        device = resolve_device(settings.device)
        if models is None:
            models = [compiled(m.model(device), settings.compile) for m in ensemble.members]
        plan = settings.plan(ensemble.schedule, conditioned=ensemble.conditioned)
        size = prepared.geometry.size
        batch = settings.batch_size or default_batch_size(device, size)

        def steps(ks: list[int]) -> Iterator[int | FrameResult]:
            return restore_frame_steps(
                models, ensemble.names, images[ks], np.ones((len(ks), size, size), dtype=bool), ks,
                plan, ensemble.schedule, seed=settings.seed, conditioned=ensemble.conditioned,
                device=device, precision=settings.precision, faithful_ssim=settings.faithful_ssim,
            )  # fmt: skip

        for ks, result in halving_batches(todo, batch, device, steps):  # halved on out-of-memory
            if isinstance(result, FrameResult):
                maps[ks] = result.maps
                rest[ks] = result.restorations.mean(axis=0)
    scaled = fidelity_scale(prepared, rest)
    return FrameRestoration(
        prepared.geometry,
        images,
        masks,
        maps,
        rest,
        np.asarray(todo, dtype=int),
        prepared.foreground,
        prepared.normalised,
        *(scaled or (None, None)),
    )
