"""Task names and the fold table (3 training tasks, 2 validation tasks per fold)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

__all__ = ["FOLDS", "TASKS", "fold_tasks", "task_index", "task_indices"]

TASKS = ("poisson_intra", "poisson_inter", "sink", "source", "intensity")
_ALIASES = {"intra": 0, "inter": 1, "smooth_intensity": 4}
FOLDS: tuple[tuple[int, ...], ...] = tuple(itertools.combinations(range(len(TASKS)), 3))


def task_index(task: int | str) -> int:
    """Index in :data:`TASKS` of a task given by index or name (``"intra"``/``"inter"`` too)."""
    if isinstance(task, str):
        key = task.strip().lower().replace("-", "_")
        if key in TASKS:
            return TASKS.index(key)
        if key in _ALIASES:
            return _ALIASES[key]
        if key.isdigit():
            return task_index(int(key))
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)} or 0-4")
    index = int(task)
    if index != task or not 0 <= index < len(TASKS):
        raise ValueError(f"task index must be 0-{len(TASKS) - 1}, got {task!r}")
    return index


def task_indices(tasks: Iterable[int | str]) -> tuple[int, ...]:
    """Indices of several tasks, duplicates removed, order kept."""
    return tuple(dict.fromkeys(task_index(t) for t in tasks))


def fold_tasks(fold: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(training tasks, validation tasks)`` of a fold: ``combinations(range(5), 3)[fold]``."""
    if int(fold) != fold or not 0 <= int(fold) < len(FOLDS):
        raise ValueError(f"fold must be 0-{len(FOLDS) - 1}, got {fold!r}")
    train = FOLDS[int(fold)]
    return train, tuple(t for t in range(len(TASKS)) if t not in train)
