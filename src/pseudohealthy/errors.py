"""Exceptions that the command line reports as one line (no traceback unless --debug)."""

from __future__ import annotations

from pathlib import Path


class PseudohealthyError(Exception):
    """Base class: a user-facing problem with a one-line explanation."""


class ScanError(PseudohealthyError):
    """A scan (or mask) cannot be read or used; names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}" if path is not None else problem)


class CheckpointError(PseudohealthyError):
    """A checkpoint is missing, corrupt or mismatched; names the file and the field."""

    def __init__(self, path: str | Path, problem: str, field: str | None = None) -> None:
        self.path = Path(path)
        self.field = field
        self.problem = problem
        where = f" (field '{field}')" if field else ""
        super().__init__(f"{path}{where}: {problem}")


class NonFiniteError(PseudohealthyError):
    """A computation produced NaN or infinite values (e.g. a network's output); names the source
    (the ensemble members) and the problem, instead of writing NaN results."""

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class ScanWarning(UserWarning):
    """Something in a scan was repaired (e.g. NaN voxels replaced)."""
