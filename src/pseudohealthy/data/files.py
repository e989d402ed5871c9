"""Writing files safely: every file the project writes goes to a temporary name in its folder
first and is renamed into place only when complete, so a crash, a kill or a full disk never
leaves a half-written file under a final name. Temporary names are hidden (``.<name>.<hex>.tmp``
plus the final suffix, so writers that choose a format by extension still work) and
:func:`is_temporary_name` tells readers to skip them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["TEMP_MARK", "atomic_write", "is_temporary_name", "write_json", "write_text"]

TEMP_MARK = ".tmp"
"""Marker of temporary names (between the hidden prefix and the final suffix)."""

_SUFFIXES = (".nii.gz", ".tar.gz")


def _suffix(name: str) -> str:
    """The final suffix of ``name`` that writers read (``.nii.gz`` counts as one)."""
    lower = name.lower()
    for ext in _SUFFIXES:
        if lower.endswith(ext):
            return name[-len(ext) :]
    return Path(name).suffix


def is_temporary_name(path: str | Path) -> bool:
    """True for the hidden temporary names :func:`atomic_write` uses (never a scan or an output)."""
    name = Path(path).name
    return name.startswith(".") and TEMP_MARK in name


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it to ``path``.

    The temporary file keeps the final suffix; it is removed when ``write`` fails (the exception
    propagates) and the folder is created when missing. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = TEMP_MARK + _suffix(path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes owner-only files; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Mapping[str, Any] | list, **dumps: Any) -> Path:
    """Write ``data`` as indented JSON (newline-terminated) atomically; ``dumps`` go to json.dumps."""
    text = json.dumps(data, indent=2, **dumps) + "\n"
    return write_text(path, text)
