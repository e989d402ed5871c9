"""PNG figures the project writes: restoration previews (:mod:`.preview`), the synthetic-task
gallery (:mod:`.gallery`) and PR/ROC curves (:mod:`.plots`), each written through
:func:`save_figure` (atomically, via :mod:`pseudohealthy.data.files`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pseudohealthy.data.files import atomic_write
from pseudohealthy.errors import ScanError

__all__ = ["save_figure"]


def save_figure(fig: Any, path: str | Path, *, dpi: int) -> Path:
    """Write a matplotlib figure as a PNG to a temporary name, renamed to ``path`` when complete.

    A failed write (a full disk, a read-only folder) leaves nothing under ``path`` and raises a
    :class:`~pseudohealthy.errors.ScanError` that names ``path`` and the reason.
    """
    path = Path(path)
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    except OSError as exc:
        raise ScanError(path, f"cannot write ({exc.strerror or exc})") from exc
