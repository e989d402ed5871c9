"""`pseudohealthy` command line: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence

from pseudohealthy import __version__
from pseudohealthy.errors import PseudohealthyError

# subcommand name -> module under pseudohealthy.cli; each module defines
# `register(subparsers) -> argparse.ArgumentParser` that sets `func=run`.
SUBCOMMANDS = {
    "synth": "synth",
    "preprocess": "preprocess",
    "train": "train",
    "restore": "restore",
    "evaluate": "evaluate",
    "view": "view",
    "sample": "sample",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(
        prog="pseudohealthy",
        description="Anomaly detection by pseudo-healthy restoration with image-conditioned diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"pseudohealthy {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="less output (no progress bars)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMANDS.values():
        try:
            mod = importlib.import_module(f"pseudohealthy.cli.{module}")
        except ModuleNotFoundError as exc:  # subcommand not built (yet)
            if exc.name == f"pseudohealthy.cli.{module}":
                continue
            raise
        mod.register(sub)
    return parser


@contextlib.contextmanager
def _one_line_warnings(command: str, enabled: bool) -> Iterator[None]:
    """Format warnings as ``pseudohealthy CMD: warning: MESSAGE`` (one line) while the command runs."""
    saved = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None) -> str:
        return f"pseudohealthy {command}: warning: {' '.join(str(message).split())}\n"

    if enabled:
        warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        with _one_line_warnings(args.command, enabled=not args.debug):  # --debug: Python's form
            result = args.func(args)
    except PseudohealthyError as exc:
        if args.debug:
            raise
        print(f"pseudohealthy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command did not wrap (the OS's reason, in one line)
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"pseudohealthy {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pseudohealthy {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
