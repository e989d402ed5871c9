"""The five synthetic anomaly tasks of Baugh et al. (MICCAI 2023) on 2D slices in [0, 1].

Tasks by fold-table index: 0 Poisson image editing with another image of the same set,
1 the same with another modality, 2 sink and 3 source deformation, 4 smooth intensity
change. Every task returns ``(corrupted, mask)``; the image keeps its range and changes
only inside the mask (the reference's Poisson tasks: inside the mask's box). ``STYLES``
switches between the reference's details (the default) and this project's earlier ones.
"""

from __future__ import annotations

from .corrupt import Corruptor, apply_task
from .folds import FOLDS, TASKS, fold_tasks, task_index, task_indices
from .poisson import blend, mixed_gradients, poisson_solve
from .rng import keyed_rng, sample_rng, worker_rng
from .shapes import Shape, draw_shape, sample_shape
from .sources import DEFAULT_PHOTOS, load_inter_sources
from .style import DEFAULT_STYLE, STYLES, check_style

__all__ = [
    "DEFAULT_PHOTOS",
    "DEFAULT_STYLE",
    "FOLDS",
    "STYLES",
    "TASKS",
    "Corruptor",
    "Shape",
    "apply_task",
    "blend",
    "check_style",
    "draw_shape",
    "fold_tasks",
    "keyed_rng",
    "load_inter_sources",
    "mixed_gradients",
    "poisson_solve",
    "sample_rng",
    "sample_shape",
    "task_index",
    "task_indices",
    "worker_rng",
]
