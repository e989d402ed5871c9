"""`pseudohealthy synth`: write synthetic anomalies of a scan (NIfTI) and a PNG gallery."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from pseudohealthy.cli.batch import OutputSet, check_output_dir
from pseudohealthy.errors import PseudohealthyError, ScanError

GALLERY_SLICES = 3


class _TaskStyles(Sequence[str]):
    """:data:`~pseudohealthy.data.anomalies.STYLES`, read when argparse first needs them (to check
    a value or print the help): importing :mod:`pseudohealthy.data.anomalies` loads numpy, and
    building the parser stays standard library only."""

    @staticmethod
    def _styles() -> tuple[str, ...]:
        from pseudohealthy.data.anomalies.style import STYLES

        return STYLES

    def __getitem__(self, index):
        return self._styles()[index]

    def __len__(self) -> int:
        return len(self._styles())


def add_task_style_argument(parser: argparse.ArgumentParser) -> None:
    """``--task-style`` (choices :data:`~pseudohealthy.data.anomalies.STYLES`), shared by ``synth``
    and ``train``. Its parsed default is None: :func:`task_style` gives ``synth`` the default style,
    ``train`` takes the run being resumed's, else :class:`TrainConfig`'s."""
    parser.add_argument(
        "--task-style",
        choices=_TaskStyles(),
        metavar="STYLE",
        help="the synthetic tasks' details (%(choices)s): 'reference' (the default) follows Baugh et "
        "al.'s task library, 'legacy' keeps this project's earlier tasks, to measure the departure "
        "(see docs/FAITHFULNESS.md)",
    )


def task_style(args: argparse.Namespace) -> str:
    """The ``--task-style`` given, else :data:`~pseudohealthy.data.anomalies.DEFAULT_STYLE`."""
    from pseudohealthy.data.anomalies.style import DEFAULT_STYLE

    return args.task_style or DEFAULT_STYLE


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``synth`` subcommand."""
    parser = subparsers.add_parser(
        "synth",
        help="corrupt a scan with the synthetic anomaly tasks (NIfTI + PNG gallery)",
        description=(
            "Corrupt the foreground axial slices of SCAN with synthetic anomalies, as used for "
            "training, and write <name>_<task>_corrupted.nii.gz and <name>_<task>_mask.nii.gz in "
            "the scan's own geometry, plus <name>_gallery.png. The output folder is checked before "
            "anything is computed; the outputs appear together or not at all, and nothing existing "
            "is replaced without --overwrite."
        ),
    )
    parser.add_argument("scan", type=Path, help="input NIfTI scan")
    parser.add_argument(
        "--task",
        default="all",
        help="task name or index (poisson_intra, poisson_inter, sink, source, intensity), "
        "several separated by commas, or 'all' (default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--brain-mask", type=Path, help="brain mask NIfTI (default: voxels above background)")
    parser.add_argument("--inter-dir", type=Path, help="folder of other-modality images for poisson_inter")
    parser.add_argument("--size", type=int, default=128, help="model-frame slice size (default 128)")
    parser.add_argument("--slices", type=int, help="corrupt only N evenly spaced foreground slices")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_task_style_argument(parser)
    parser.set_defaults(func=run)
    return parser


def _tasks(spec: str) -> tuple[int, ...]:
    from pseudohealthy.data.anomalies import TASKS, task_indices

    if spec.strip().lower() == "all":
        return tuple(range(len(TASKS)))
    try:
        return task_indices(s for s in spec.split(",") if s.strip())
    except ValueError as exc:
        raise PseudohealthyError(str(exc)) from None


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def run(args: argparse.Namespace) -> int:
    """Corrupt, map back, write (all outputs or none); returns 0."""
    import numpy as np
    from tqdm import tqdm

    from pseudohealthy.data.anomalies import TASKS, load_inter_sources
    from pseudohealthy.data.anomalies.scan import corrupt_scan, pick_positions
    from pseudohealthy.data.io import load_mask, load_scan, save_like
    from pseudohealthy.data.preprocess import check_image_size, prepare_scan
    from pseudohealthy.figures.gallery import save_gallery

    quiet = bool(getattr(args, "quiet", False))
    style = task_style(args)
    tasks = _tasks(args.task)
    if not tasks:
        raise PseudohealthyError("no task given")
    check_image_size(args.size, "--size")
    if args.slices is not None and args.slices < 1:
        raise PseudohealthyError(f"--slices must be at least 1, got {args.slices}")

    out_dir = check_output_dir(args.output)
    volume = load_scan(args.scan)
    name = volume.name
    outputs = {
        t: (out_dir / f"{name}_{TASKS[t]}_corrupted.nii.gz", out_dir / f"{name}_{TASKS[t]}_mask.nii.gz")
        for t in tasks
    }
    gallery_path = out_dir / f"{name}_gallery.png"
    inputs = [Path(args.scan)] + ([Path(args.brain_mask)] if args.brain_mask else [])
    for path in [p for pair in outputs.values() for p in pair] + [gallery_path]:
        if any(_same(path, src) for src in inputs):
            raise ScanError(path, "refusing to write onto an input file")
        if path.exists() and not args.overwrite:
            raise ScanError(path, "already exists (use --overwrite to replace it)")

    brain = load_mask(args.brain_mask, volume) if args.brain_mask else None
    prepared = prepare_scan(volume, size=args.size, brain_mask=brain)
    positions = pick_positions(len(prepared.indices), args.slices)
    inter = load_inter_sources(args.inter_dir, size=args.size) if 1 in tasks else None
    shown = positions[
        np.unique(np.linspace(0.25, 0.75, GALLERY_SLICES) * (len(positions) - 1)).round().astype(int)
    ]
    shown = np.unique(shown)
    rows = {}
    with OutputSet() as out:
        for t in tasks:

            def bar(it, t=t):
                return tqdm(it, desc=TASKS[t], unit="slice", disable=quiet, leave=False)

            result = corrupt_scan(
                prepared,
                t,
                seed=args.seed,
                positions=positions,
                inter_sources=inter,
                progress=bar,
                style=style,
            )
            image_path, mask_path = outputs[t]
            out.write(image_path, save_like, result.volume, volume, image_path, overwrite=args.overwrite)
            mask = result.mask_volume.astype(np.uint8)
            out.write(mask_path, save_like, mask, volume, mask_path, dtype=np.uint8, overwrite=args.overwrite)
            rows[TASKS[t]] = [
                (prepared.images[j], result.corrupted[j], result.masks[j], f"z{prepared.indices[j]}")
                for j in shown
            ]
            if not quiet:
                print(f"{TASKS[t]}: {len(positions)} slices -> {image_path}, {mask_path}")
        title = f"{name}: synthetic anomalies (seed {args.seed}, {style} tasks)"
        out.write(gallery_path, save_gallery, gallery_path, rows, title=title)
    if not quiet:
        print(f"gallery -> {gallery_path}")
    return 0
