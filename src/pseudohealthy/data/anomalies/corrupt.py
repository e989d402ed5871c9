"""Apply one task, or corrupt a sample the way training does (:class:`Corruptor`)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .deform import deformation_task
from .folds import TASKS, task_index, task_indices
from .intensity import intensity_task
from .poisson import Sources, poisson_task
from .sources import load_inter_sources
from .style import DEFAULT_STYLE, check_style

__all__ = ["Corruptor", "apply_task"]


def _check_inputs(image: np.ndarray, foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    img = np.asarray(image, dtype=np.float32)
    fg = np.asarray(foreground, dtype=bool)
    if img.ndim != 2:
        raise ValueError(f"image must be a 2D slice, got shape {img.shape}")
    if fg.shape != img.shape:
        raise ValueError(f"foreground shape {fg.shape} differs from image shape {img.shape}")
    if not fg.any():
        raise ValueError("the foreground mask is empty: there is nowhere to place an anomaly")
    return img, fg


def apply_task(
    task: int | str,
    image: np.ndarray,
    foreground: np.ndarray,
    rng: np.random.Generator,
    *,
    intra_sources: Sources | None = None,
    inter_sources: Sources | None = None,
    size: float | None = None,
    style: str = DEFAULT_STYLE,
) -> tuple[np.ndarray, np.ndarray]:
    """One anomaly of ``task`` (index or name): ``(corrupted float32, mask bool)``.

    The image keeps its range ``[image.min(), image.max()]`` and changes only inside the
    mask (the reference's Poisson tasks: inside the mask's bounding box, replaced whole).
    ``intra_sources`` (other images of the same set; required by ``poisson_intra``) and
    ``inter_sources`` (another modality; default :func:`load_inter_sources`) are lists of
    2D arrays or functions ``rng -> array``. ``size``: the reference image size for shape
    and edge scales (default: the image's own size). ``style``: one of :data:`STYLES`.
    """
    check_style(style)
    index = task_index(task)
    img, fg = _check_inputs(image, foreground)
    if index == 0:
        if intra_sources is None:
            raise ValueError("task 'poisson_intra' needs intra_sources: other images of the same data set")
        return poisson_task(img, fg, rng, intra_sources, size=size, style=style)
    if index == 1:
        if inter_sources is None:
            inter_sources = load_inter_sources(size=max(img.shape))
        return poisson_task(img, fg, rng, inter_sources, size=size, style=style)
    if index in (2, 3):
        return deformation_task(img, fg, rng, TASKS[index], size=size, style=style)
    return intensity_task(img, fg, rng, size=size, style=style)


class Corruptor:
    """Corrupt a training sample: no task with ``p_none``, else 1..``max_anomalies`` of one task.

    After each anomaly the chain stops with ``p_stop`` (0.5); the image is clipped to its
    original range after each; ``style`` picks the tasks' details (:data:`STYLES`). Returns
    ``(corrupted, union mask, task index)``; index -1 (and ``corrupted`` a copy of the image,
    mask empty) when no task was drawn.
    """

    def __init__(
        self,
        tasks: Iterable[int | str],
        *,
        p_none: float = 0.2,
        max_anomalies: int = 4,
        intra_sources: Sources | None = None,
        inter_sources: Sources | None = None,
        p_stop: float = 0.5,
        size: float | None = None,
        style: str = DEFAULT_STYLE,
    ) -> None:
        self.tasks = task_indices(tasks)
        if not self.tasks:
            raise ValueError("a Corruptor needs at least one task")
        if not 0.0 <= p_none <= 1.0 or not 0.0 <= p_stop <= 1.0:
            raise ValueError("p_none and p_stop must be probabilities")
        if max_anomalies < 1:
            raise ValueError("max_anomalies must be at least 1")
        self.p_none = float(p_none)
        self.p_stop = float(p_stop)
        self.max_anomalies = int(max_anomalies)
        self.intra_sources = intra_sources
        self.inter_sources = inter_sources
        self.size = size
        self.style = check_style(style)

    def __repr__(self) -> str:
        names = ", ".join(TASKS[t] for t in self.tasks)
        return (
            f"Corruptor([{names}], p_none={self.p_none}, max_anomalies={self.max_anomalies}, "
            f"style={self.style!r})"
        )

    def __call__(
        self,
        image: np.ndarray,
        foreground: np.ndarray,
        rng: np.random.Generator,
        *,
        intra_sources: Sources | None = None,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """``(corrupted float32, mask bool, task index)``; per-call ``intra_sources`` optional."""
        img, fg = _check_inputs(image, foreground)
        if rng.random() < self.p_none:
            return img.copy(), np.zeros(img.shape, dtype=bool), -1
        index = self.tasks[int(rng.integers(len(self.tasks)))]
        intra = self.intra_sources if intra_sources is None else intra_sources
        lo, hi = float(img.min()), float(img.max())
        out, mask = img, np.zeros(img.shape, dtype=bool)
        for n in range(self.max_anomalies):
            out, m = apply_task(
                index,
                out,
                fg,
                rng,
                intra_sources=intra,
                inter_sources=self.inter_sources,
                size=self.size,
                style=self.style,
            )
            np.clip(out, lo, hi, out=out)
            mask |= m
            if n + 1 < self.max_anomalies and rng.random() < self.p_stop:
                break
        return out, mask, index
