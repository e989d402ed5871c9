"""What every command that writes files shares: the output folder checked before any computing
(:func:`check_output_dir`), distinct output names for inputs that share a file name
(:func:`distinct_names`), write failures as one line (:func:`writing`, :class:`WriteError`), a
unit's outputs whole or not at all (:class:`OutputSet`), and runs over many inputs that report each
failure in one line, go on with the rest and end with a count (:class:`Batch`).

Standard library only (``pseudohealthy --help`` imports every command module).
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pseudohealthy.errors import PseudohealthyError

__all__ = [
    "STOP_ERRNOS",
    "Batch",
    "OutputSet",
    "WriteError",
    "add_precision_argument",
    "add_sampler_arguments",
    "add_scans_argument",
    "add_ssim_arguments",
    "check_output_dir",
    "distinct_names",
    "output_names",
    "restore_settings",
    "writing",
]

T = TypeVar("T")

STOP_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""Write failures that every later input would hit too (full disk, quota, read-only): a batch stops."""


class WriteError(PseudohealthyError):
    """A file could not be written: ``cannot write <path>: <reason>`` (e.g. No space left on device)."""

    def __init__(self, path: str | Path, reason: str, errno_: int | None = None) -> None:
        self.path = Path(path)
        self.reason = reason
        self.errno = errno_
        super().__init__(f"cannot write {path}: {reason}")


def add_scans_argument(parser: Any) -> None:
    """The ``SCAN...`` positional of the commands that take many scans (restore, preprocess)."""
    parser.add_argument(
        "scans", nargs="+", type=Path, metavar="SCAN",
        help="NIfTI scans, DICOM series folders, or folders of them",
    )  # fmt: skip


def add_precision_argument(parser: Any, *, unset: bool = False) -> None:
    """``--precision`` (``args.precision``; default ``auto``: bf16/fp16 autocast where the device
    has it, fp32 elsewhere, :func:`pseudohealthy.device.autocast_dtype`), for every face that runs
    the network. ``unset``: None when not given (``train``: the config or the resumed run decides)."""
    from pseudohealthy.engine.defaults import PRECISIONS

    parser.add_argument(
        "--precision",
        default=None if unset else PRECISIONS[0],
        choices=PRECISIONS,
        help=f"the network's precision (default {PRECISIONS[0]}: bf16 autocast on CPUs that have it)",
    )


def add_sampler_arguments(parser: Any) -> None:
    """How the engine runs, for every face that restores: ``--sampler``, ``--steps``,
    ``--spacing``, ``--seed``, ``--device``, ``--precision``, ``--batch-size`` and the SSIM
    constants (:func:`add_ssim_arguments`); :func:`restore_settings` reads them back. Defaults
    from :mod:`pseudohealthy.engine.defaults`."""
    from pseudohealthy.engine import defaults

    sampler, spacing = defaults.DEFAULT_SAMPLER, defaults.DEFAULT_SPACING
    parser.add_argument(
        "--sampler", choices=defaults.SAMPLERS, default=sampler, help=f"sampler (default {sampler})"
    )
    steps = ", ".join(f"{n} for {name}" for name, n in defaults.DEFAULT_STEPS.items())
    parser.add_argument("--steps", type=int, help=f"sampler steps (default {steps}); one network call each")
    parser.add_argument(
        "--spacing",
        choices=defaults.SPACINGS,
        default=spacing,
        help=f"timestep spacing of ddpm/ddim (default {spacing}; trailing starts at T-1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto (default: CUDA if present), cpu, cuda, cuda:N")
    add_precision_argument(parser)
    parser.add_argument("--batch-size", type=int, help="slices per batch (default: 8 on CPU, 32 on GPU)")
    add_ssim_arguments(parser)


def restore_settings(args: Any, **extra: Any) -> Any:
    """The :class:`~pseudohealthy.engine.settings.RestoreSettings` of :func:`add_sampler_arguments`'
    options in ``args``, with ``extra`` fields (a face's own options) on top; not yet validated."""
    from pseudohealthy.engine.settings import RestoreSettings

    shared = {
        "sampler": args.sampler,
        "steps": args.steps,  # None: the sampler's default
        "spacing": args.spacing,
        "seed": args.seed,
        "device": args.device,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "faithful_ssim": args.faithful_ssim,
    }
    return RestoreSettings(**{**shared, **extra})


def add_ssim_arguments(parser: Any) -> None:
    """``--faithful-ssim`` / ``--unit-ssim`` (``args.faithful_ssim``; default
    :data:`~pseudohealthy.engine.defaults.FAITHFUL_SSIM`), the map's SSIM constants for every face."""
    from pseudohealthy.engine.defaults import FAITHFUL_SSIM

    ssim = parser.add_mutually_exclusive_group()
    ssim.add_argument(
        "--faithful-ssim",
        dest="faithful_ssim",
        action="store_const",
        const=True,
        default=FAITHFUL_SSIM,
        help="the reference's SSIM constants, data range 255 on [0, 1] images"
        + (" (the default)" if FAITHFUL_SSIM else ""),
    )
    ssim.add_argument(
        "--unit-ssim",
        dest="faithful_ssim",
        action="store_const",
        const=False,
        help="SSIM constants of data range 1, the former default (maps span [0, 1])"
        + ("" if FAITHFUL_SSIM else " (the default)"),
    )


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (itself, or the cause a library wrapped it in)."""
    while exc is not None:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__
    return None


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a failed write of ``path`` (an OSError, or a library error caused by one) into a
    :class:`WriteError` that names the final path (the library's, when it names one), never the
    temporary one."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, PseudohealthyError) as exc:
        cause = _os_error(exc)
        if cause is None:
            raise
        named = getattr(exc, "path", None) if isinstance(exc, PseudohealthyError) else None
        raise WriteError(named or path, cause.strerror or str(cause), cause.errno) from exc


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def check_output_dir(path: str | Path, option: str = "-o") -> Path:
    """Refuse, before any computing, an output folder that is a file or cannot be created or written.

    Nothing is created: the folder (or, when it does not exist yet, its nearest existing parent,
    where it would be created) must be a folder this process may write into. Raises a one-line
    :class:`PseudohealthyError` that names the path; returns ``path``.
    """
    path = Path(path)
    base = _nearest_existing(path.absolute())
    if base.is_symlink() and not base.exists():
        raise PseudohealthyError(f"{option} {path}: {base} is a broken link")
    if not base.is_dir():
        if base == path.absolute():
            raise PseudohealthyError(f"{option} {path}: exists and is not a folder")
        raise PseudohealthyError(f"{option} {path}: cannot create the folder ({base} is a file)")
    if not os.access(base, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only(base) else "permission denied"
        if base == path.absolute():
            raise PseudohealthyError(f"{option} {path}: cannot write into the folder ({reason})")
        raise PseudohealthyError(f"{option} {path}: cannot create the folder in {base} ({reason})")
    return path


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def distinct_names(paths: Sequence[str | Path], name: Callable[[Path], str]) -> list[str]:
    """Output names of ``paths``, one each and all different: the one naming rule of the commands.

    Each input is named ``name(path)`` (its file name without the suffix). Where several inputs
    share a name, each of them is prefixed with its folder's name, as ``pseudohealthy evaluate``
    names its cases (``a/FLAIR.nii.gz``, ``b/FLAIR.nii.gz`` -> ``a_FLAIR``, ``b_FLAIR``); a name
    that still collides (``p/a/x`` and ``q/a/x``, or the same file given twice) gets ``_2``,
    ``_3``... in input order. An input whose name is unique keeps it unchanged.
    """
    base = [name(Path(p)) for p in paths]
    counts: dict[str, int] = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    used = {b for b in base if counts[b] == 1}
    out = []
    for p, b in zip(paths, base, strict=True):
        if counts[b] == 1:
            out.append(b)
            continue
        folder = Path(p).absolute().parent.name
        wanted = f"{folder}_{b}" if folder else b
        unique, k = wanted, 1
        while unique in used:
            k += 1
            unique = f"{wanted}_{k}"
        used.add(unique)
        out.append(unique)
    return out


def output_names(scans: Sequence[str | Path]) -> list[str]:
    """The output names of scans (:func:`distinct_names` of their file names, as
    :func:`pseudohealthy.data.io.scan_name` gives them); prints, also with ``-q``, each scan that
    was named after its folder."""
    from pseudohealthy.data.io import scan_name

    names = distinct_names(scans, scan_name)
    for path, name in zip(scans, names, strict=True):
        if name != scan_name(path):
            print(f"{path}: another input has the same name; its outputs are named {name}_*")
    return names


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


class OutputSet:
    """The files of one unit of work (a scan's outputs), written whole or not at all.

    ``with OutputSet() as out: out.write(path, save, array, path)`` calls the (atomic) writer and
    records the files it wrote; when the block fails, the files it already wrote are removed, so
    no half set of a unit's outputs is left behind (and a rerun does not find them in its way).
    Write failures become :class:`WriteError`.
    """

    def __init__(self) -> None:
        self.written: list[Path] = []

    def write(
        self, paths: str | Path | Sequence[Path], write: Callable[..., T], *args: Any, **kwargs: Any
    ) -> T:
        """Call ``write(*args, **kwargs)``, which writes ``paths`` (one path or several) atomically.

        Each of ``paths`` that the call wrote (replaced or created) is recorded, also when the call
        failed after some of them.
        """
        targets = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
        before = [_stamp(p) for p in targets]
        try:
            with writing(targets[0]):
                return write(*args, **kwargs)
        finally:
            for target, stamp in zip(targets, before, strict=True):
                now = _stamp(target)
                if now is not None and now != stamp:
                    self.written.append(target)

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None:
            for path in self.written:
                path.unlink(missing_ok=True)
        return False


class Batch:
    """A run over many inputs: each failure is one line, the rest go on, a count at the end.

    ``for item in batch.each(items): with batch.attempt(): work(item)``; :meth:`finish` prints
    ``"2 of 5 scans failed"`` (when any failed and there was more than one input) and returns
    the exit code (0, or 2). A write failure that every later input would hit too (a full disk,
    a read-only folder: :data:`STOP_ERRNOS`) stops the run. With ``debug`` a failure raises.
    ``echo`` prints a line (default: to stderr; e.g. ``tqdm.write`` under a progress bar).
    """

    def __init__(
        self,
        command: str,
        total: int,
        *,
        noun: str = "scan",
        debug: bool = False,
        echo: Callable[[str], object] | None = None,
    ) -> None:
        self.echo = echo or (lambda line: print(line, file=sys.stderr))
        self.command = command
        self.total = total
        self.noun = noun
        self.debug = debug
        self.failed: list[str] = []
        self.attempted = 0
        self.stopped = False

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """The items, until a failure stopped the run."""
        for item in items:
            if self.stopped:
                return
            self.attempted += 1
            yield item

    def fail(self, exc: BaseException, label: str | None = None) -> None:
        """Report one failure (one line on stderr) and count it; stop on a full disk and the like."""
        if self.debug:
            raise exc
        cause = _os_error(exc)
        if isinstance(exc, OSError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror or exc}"
        else:
            message = " ".join(str(exc).split()) or type(exc).__name__
        self.echo(f"pseudohealthy {self.command}: error: {message}")
        self.failed.append(label or message)
        if cause is not None and cause.errno in STOP_ERRNOS:
            self.stopped = True

    @contextmanager
    def attempt(self, label: str | None = None) -> Iterator[None]:
        """Run the block; a :class:`PseudohealthyError` or OSError in it is reported, not raised."""
        try:
            yield
        except (PseudohealthyError, OSError) as exc:
            self.fail(exc, label)

    def run(self, fn: Callable[..., T], *args: Any, label: str | None = None, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)`` inside :meth:`attempt`; its result, or None when it failed."""
        with self.attempt(label):
            return fn(*args, **kwargs)
        return None

    def summary(self) -> str:
        """``"2 of 5 scans failed"`` (plus how many were not attempted after a stop)."""
        plural = self.noun if self.total == 1 else f"{self.noun}s"
        text = f"{len(self.failed)} of {self.total} {plural} failed"
        if self.stopped and self.attempted < self.total:
            text += f" ({self.total - self.attempted} not attempted: stopped at the write error above)"
        return text

    def finish(self) -> int:
        """Print the count when something failed (and there was more than one input); the exit code."""
        if not self.failed:
            return 0
        if self.total > 1:
            self.echo(f"pseudohealthy {self.command}: {self.summary()}")
        return 2
