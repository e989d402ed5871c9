"""`pseudohealthy sample`: where the bundled sample scan, its mask and the demo ensemble are."""

from __future__ import annotations

import argparse
from pathlib import Path

WHAT = ("scan", "mask", "ensemble")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``sample`` subcommand."""
    parser = subparsers.add_parser(
        "sample",
        help="print (or copy) the paths of the bundled sample scan, its mask and the demo ensemble",
        description=(
            "Print the paths of the bundled data: a real BraTS 2013 FLAIR scan (patient 0006), its "
            "tumour mask and the demo ensemble (which --ensemble also accepts by its name, demo). "
            "With WHAT, print only that path (for the shell: "
            'pseudohealthy restore "$(pseudohealthy sample scan)" --ensemble demo -o out). '
            "With --copy DIR, copy the scan, the mask, the demo ensemble folder and the data's "
            "licence into DIR (each renamed into place when complete; nothing existing is replaced "
            "without --overwrite) and print the copies' paths."
        ),
    )
    parser.add_argument(
        "what", nargs="?", choices=WHAT, metavar="WHAT", help="print only this path: scan, mask or ensemble"
    )
    parser.add_argument("--copy", type=Path, metavar="DIR", help="copy the bundled data into DIR")
    parser.add_argument("--overwrite", action="store_true", help="with --copy: replace existing copies")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from pseudohealthy.data.sample import (
        bundled_ensemble_path,
        copy_sample,
        sample_mask_path,
        sample_scan_path,
    )
    from pseudohealthy.errors import PseudohealthyError

    try:
        if args.copy is not None:
            from pseudohealthy.cli.batch import check_output_dir

            check_output_dir(args.copy, "--copy")
            paths = copy_sample(args.copy, overwrite=args.overwrite)
        else:
            paths = {
                "scan": sample_scan_path(),
                "mask": sample_mask_path(),
                "ensemble": bundled_ensemble_path("demo"),
            }
    except FileNotFoundError as exc:
        raise PseudohealthyError(str(exc)) from None
    if args.what:
        print(paths[args.what])
        return 0
    notes = {"ensemble": "  (--ensemble demo)" if args.copy is None else ""}
    for key in (*WHAT, *(k for k in paths if k not in WHAT)):
        print(f"{key:<9} {paths[key]}{notes.get(key, '')}")
    return 0
