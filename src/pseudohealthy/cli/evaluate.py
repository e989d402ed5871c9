"""`pseudohealthy evaluate`: benchmark metrics of anomaly maps vs lesion masks, pooled over a test set."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pseudohealthy.cli.batch import (
    Batch,
    OutputSet,
    add_sampler_arguments,
    check_output_dir,
    restore_settings,
)
from pseudohealthy.engine.defaults import default_steps
from pseudohealthy.errors import PseudohealthyError
from pseudohealthy.evaluation.choices import DEFAULT_FRAME, FRAMES, NATIVE_SIZE

OUTPUTS = ("metrics.json", "pr_curve.png", "roc_curve.png")
MAPS_DIR = "anomaly_maps"  # OUT/anomaly_maps/<name>_anomaly.nii.gz: maps restored here, for reuse


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand."""
    parser = subparsers.add_parser(
        "evaluate",
        help="benchmark metrics (AP, AUROC, Dice) of anomaly maps on scans with lesion masks",
        description=(
            "Evaluate pseudo-healthy anomaly maps against lesion masks, pooled over all scans, in "
            "the reference's model frame (--frame model: the ensemble's maps as restored, every "
            "axial slice, masks resized then > 0.4, map zeroed where the input is 0, squares "
            "cropped) or after the scan's grid (--frame native: SIZE x SIZE, slices with >= 1%% "
            "brain, squares padded; the frame of maps read from --restorations), pooled over all "
            "scans: AP_i, AUROC (slice level), AP_p, best Dice and Dice at 5% FPR (pixel level), "
            "next to the intensity baseline (Meissen et al.). Maps come from --restorations "
            "(<name>_anomaly.nii.gz written by 'pseudohealthy restore', reused as they are) or "
            "are computed with --ensemble and saved to OUT/anomaly_maps/<name>_anomaly.nii.gz "
            "(an existing one is refused before anything is computed: reuse it with "
            "--restorations OUT/anomaly_maps, or replace it with --overwrite). Writes "
            "metrics.json, pr_curve.png and roc_curve.png. A scan that fails is reported in one "
            "line and the others go on (their maps are still saved), but no metrics are written "
            "then (pooled metrics need the whole set): the run ends with a count and exit status 2."
        ),
    )
    data = parser.add_argument_group("test set (one of)")
    data.add_argument("--scans", nargs="+", type=Path, metavar="SCAN", help="NIfTI scans")
    data.add_argument("--masks", nargs="+", type=Path, metavar="MASK", help="lesion masks, one per scan")
    data.add_argument(
        "--brain-masks", nargs="+", type=Path, metavar="BRAIN", help="brain masks, one per scan"
    )
    data.add_argument("--pairs", type=Path, help="CSV with rows scan,mask[,brain_mask]")
    data.add_argument("--dataset-dir", type=Path, help="folder searched with --scan-glob")
    data.add_argument(
        "--scan-glob", default="*/FLAIR.nii.gz", help="scans under --dataset-dir (default */FLAIR.nii.gz)"
    )
    data.add_argument("--mask-name", default="lesion_mask.nii.gz", help="mask file beside each scan")
    data.add_argument(
        "--brain-mask-name", help="brain mask file beside each scan (default: above background)"
    )
    maps = parser.add_argument_group("anomaly maps")
    maps.add_argument("--restorations", type=Path, help="folder of <name>_anomaly.nii.gz to reuse")
    maps.add_argument(
        "--ensemble", type=Path, help="ensemble folder (or bundled name: demo) to restore scans without a map"
    )
    add_sampler_arguments(maps)
    parser.add_argument(
        "--slices-per-volume", type=int, help="evaluate N evenly spaced slices per scan (quick runs)"
    )
    parser.add_argument(
        "--frame",
        choices=FRAMES,
        help=f"evaluation frame (default {DEFAULT_FRAME}; native when maps are read from --restorations)",
    )
    parser.add_argument(
        "--square",
        metavar="MODE",
        help="make slices square: crop or pad (default: crop in the model frame, pad in native)",
    )
    parser.add_argument(
        "--size",
        type=int,
        help=f"native frame size (default {NATIVE_SIZE}; the model frame is the ensemble's)",
    )
    parser.add_argument("--invert-baseline", action="store_true", help="baseline scores dark voxels (T1)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (created)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (metrics, plots and OUT/anomaly_maps/<name>_anomaly.nii.gz)",
    )
    parser.set_defaults(func=run)
    return parser


def _cases(args: argparse.Namespace):
    from pseudohealthy.evaluation.testsets import cases_from_csv, cases_from_dir, cases_from_lists

    modes = [bool(args.scans or args.masks), args.pairs is not None, args.dataset_dir is not None]
    if sum(modes) != 1:
        raise PseudohealthyError("give the test set one way: --scans/--masks, --pairs or --dataset-dir")
    if args.pairs is not None:
        return cases_from_csv(args.pairs)
    if args.dataset_dir is not None:
        return cases_from_dir(args.dataset_dir, args.scan_glob, args.mask_name, args.brain_mask_name)
    if not args.scans or not args.masks:
        raise PseudohealthyError("--scans needs --masks (one lesion mask per scan)")
    return cases_from_lists(args.scans, args.masks, args.brain_masks)


def _check(args: argparse.Namespace, cases) -> None:
    from pseudohealthy.data.preprocess import check_image_size

    check_output_dir(args.output)
    if args.size is not None:
        check_image_size(args.size, "--size")
    if args.slices_per_volume is not None and args.slices_per_volume < 1:
        raise PseudohealthyError(f"--slices-per-volume must be at least 1, got {args.slices_per_volume}")
    if args.steps is not None and args.steps < 1:
        raise PseudohealthyError(f"--steps must be at least 1, got {args.steps}")
    if args.restorations is None and args.ensemble is None:
        raise PseudohealthyError("give --restorations (existing anomaly maps) and/or --ensemble")
    if args.restorations is not None and not args.restorations.is_dir():
        raise PseudohealthyError(f"{args.restorations}: restorations folder not found")
    from pseudohealthy.data.io import scan_exists

    for case in cases:
        if not scan_exists(case.scan):
            raise PseudohealthyError(f"{case.scan}: scan not found ({case.name})")
        for path in (case.mask, case.brain_mask):
            if path is not None and not path.is_file():
                raise PseudohealthyError(f"{path}: file not found ({case.name})")
    for name in OUTPUTS:
        path = args.output / name
        if path.exists() and not args.overwrite:
            raise PseudohealthyError(f"{path}: already exists (use --overwrite to replace it)")


def _check_saved_maps(args: argparse.Namespace, cases, missing: list[str]) -> None:
    """Refuse (without --overwrite) to restore a case whose map would replace a saved one."""
    from pseudohealthy.evaluation.cases import saved_map_path

    if args.overwrite:
        return
    save_dir = Path(args.output) / MAPS_DIR
    for case in cases:
        path = saved_map_path(save_dir, case)
        if case.name in missing and path.exists():
            raise PseudohealthyError(
                f"{path}: already exists (reuse the saved maps with --restorations {save_dir}, "
                "or replace them with --overwrite)"
            )


def _frame_rules(args: argparse.Namespace, cases):
    """The frame's rules and the square to restore with (None: the ensemble's own, native)."""
    from pseudohealthy.evaluation.frame import resolve_rules
    from pseudohealthy.evaluation.testsets import find_restoration

    reused = [c.name for c in cases if find_restoration(c, args.restorations) is not None]
    from pseudohealthy.engine.settings import SQUARES

    if args.square is not None and args.square not in SQUARES:
        raise PseudohealthyError(f"--square must be one of {', '.join(SQUARES)}, got {args.square!r}")
    rules = resolve_rules(args.frame, args.square, reused=bool(reused))
    if rules.frame == "model" and reused:
        raise PseudohealthyError(
            f"--frame model scores maps as the ensemble restores them; those in {args.restorations} "
            f"(for {', '.join(reused)}) are in the scan's grid: use --frame native or drop --restorations"
        )
    if rules.frame == "model" and args.size is not None:
        raise PseudohealthyError("--size sets the native frame; the model frame is the ensemble's image size")
    return rules, (rules.square if rules.frame == "model" else args.square)


def _settings(args: argparse.Namespace):
    return restore_settings(args, square=args.restore_square)


def _missing(args: argparse.Namespace, cases) -> list[str]:
    """The cases without a map in --restorations; checked to be restorable."""
    from pseudohealthy.evaluation.testsets import find_restoration

    model = args.rules.frame == "model"
    missing = [c.name for c in cases if model or find_restoration(c, args.restorations) is None]
    if missing and args.ensemble is None:
        where = f"in {args.restorations}" if args.restorations else "anywhere"
        raise PseudohealthyError(
            f"no anomaly map {where} for {', '.join(missing)}; give --ensemble to restore them"
        )
    if missing:  # a folder, or a bundled ensemble's name (demo)
        from pseudohealthy.data.sample import resolve_ensemble

        args.ensemble = resolve_ensemble(args.ensemble)
    _check_saved_maps(args, cases, missing)
    return missing


def _write(result: dict, out_dir: Path, method: str) -> tuple[Path, Path, Path]:
    """The plots, then metrics.json; all three or none (write failures as one line)."""
    from pseudohealthy.data.files import write_text
    from pseudohealthy.evaluation.pooling import save_plots, to_json

    metrics_path = out_dir / "metrics.json"
    with OutputSet() as out:
        plots = [out_dir / name for name in OUTPUTS[1:]]
        pr_path, roc_path = out.write(plots, save_plots, result, out_dir, method)
        out.write(metrics_path, write_text, metrics_path, to_json(result))
    return metrics_path, pr_path, roc_path


def run(args: argparse.Namespace) -> int:
    """Gather the test set, get the maps, pool, write metrics.json and the plots.

    Returns 0, or 2 (after one line per failed scan and a count, with no metrics written) when
    any scan failed.
    """
    from tqdm import tqdm

    from pseudohealthy.evaluation.cases import case_entries
    from pseudohealthy.evaluation.metrics import MetricsError
    from pseudohealthy.evaluation.pooling import evaluate_maps, format_table

    quiet = bool(getattr(args, "quiet", False))
    cases = _cases(args)
    _check(args, cases)
    args.rules, args.restore_square = _frame_rules(args, cases)
    missing = _missing(args, cases)
    if args.steps is None:
        args.steps = default_steps(args.sampler)
    restore_settings = _settings(args) if missing else None
    ensemble = None
    if missing:  # read before anything is computed: a bad checkpoint fails here, once
        from pseudohealthy.model.checkpoint import Ensemble

        ensemble = Ensemble.from_dir(args.ensemble)

    out_dir = Path(args.output)
    batch = Batch("evaluate", len(cases), debug=bool(getattr(args, "debug", False)))
    entries = case_entries(
        batch.each(cases),
        restorations=args.restorations,
        ensemble=(lambda: ensemble) if missing else None,
        settings=restore_settings,
        slices_per_volume=args.slices_per_volume,
        save_dir=out_dir / MAPS_DIR if missing else None,
        overwrite=args.overwrite,
        on_error=lambda exc, name: batch.fail(exc, name),
        rules=args.rules,
    )

    def bar(it):
        return tqdm(it, total=len(cases), desc="evaluate", unit="scan", disable=quiet)

    method = f"ensemble {args.ensemble.name}" if args.ensemble and not args.restorations else "restoration"
    settings = {
        "method": method,
        "restorations": str(args.restorations) if args.restorations else None,
        "ensemble": str(args.ensemble) if args.ensemble else None,
        "restored": missing,
        "engine": restore_settings.to_dict() if restore_settings else None,
        "slices_per_volume": args.slices_per_volume,
        "size": args.size if args.rules.frame == "native" else None,
        "invert_baseline": bool(args.invert_baseline),
    }
    try:
        result = evaluate_maps(
            entries,
            size=args.size or NATIVE_SIZE,
            square=args.rules.square,
            min_foreground=args.rules.min_foreground,
            rules=args.rules,
            invert_baseline=args.invert_baseline,
            progress=bar,
            settings=settings,
        )
    except MetricsError:
        if not batch.failed:
            raise
    if batch.failed:
        print(
            f"pseudohealthy evaluate: {batch.summary()}; no metrics written (pooled metrics need "
            "every scan of the set)",
            file=sys.stderr,
        )
        return 2
    metrics_path, pr_path, roc_path = _write(result, out_dir, method)
    print(format_table(result, method))
    if not quiet:
        print(f"metrics -> {metrics_path}\nplots -> {pr_path}, {roc_path}")
    return 0
