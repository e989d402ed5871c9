"""`pseudohealthy preprocess`: skull stripping and affine registration of raw scans to MNI152."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pseudohealthy.cli.batch import Batch, OutputSet, add_scans_argument, check_output_dir, output_names
from pseudohealthy.errors import PseudohealthyError, ScanError

log = logging.getLogger("pseudohealthy.data.preprocess")
SUFFIXES = ("_preprocessed.nii.gz", "_brainmask.nii.gz", "_transform.json")
MASK_SUFFIX = "_mask.nii.gz"


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``preprocess`` subcommand."""
    parser = subparsers.add_parser(
        "preprocess",
        help="skull-strip raw scans and register them to the MNI152 template (the model's frame)",
        description=(
            "Register each SCAN (NIfTI files, DICOM series folders, or folders of them) to a T1 "
            "template (default: the "
            "bundled 2 mm MNI152, ICBM 2009a) with an affine transform (SimpleITK, mutual "
            "information), skull-strip it with the template's brain mask mapped onto the scan, "
            "and write to OUT_DIR: <name>_preprocessed.nii.gz (the brain, 0 elsewhere, in the "
            "template frame or with --space native in the scan's own grid), "
            "<name>_brainmask.nii.gz (same grid) and <name>_transform.json (the 4x4 affine, "
            "template -> scan world mm, and its inverse). Scans that share a file name are named "
            "after their folders too (a/T1.nii.gz, b/T1.nii.gz -> a_T1_*, b_T1_*; printed). Each "
            "failing scan is reported in one line and the others go on (exit status 2 after a "
            "count); a scan's outputs appear together or not at all. Needs: pip install "
            "'pseudohealthy[preprocess]'."
        ),
    )
    add_scans_argument(parser)
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT_DIR", help="output folder")
    parser.add_argument(
        "--template",
        type=Path,
        help="template T1 file or folder (T1 with 't1' in its name plus a '*mask*' file or GM/WM maps; "
        "default: the bundled 2 mm MNI152)",
    )
    parser.add_argument(
        "--template-mask", type=Path, help="brain mask of --template (default: found beside it)"
    )
    parser.add_argument(
        "--space",
        choices=("mni", "native"),
        default="mni",
        help="mni (default): resampled on the template grid; native: the brain-masked scan in its own grid",
    )
    parser.add_argument(
        "--voxel-size",
        type=float,
        metavar="MM",
        help="with --space mni: the template's box at this voxel size (default: the template's own)",
    )
    strip = parser.add_mutually_exclusive_group()
    strip.add_argument(
        "--no-skull-strip",
        action="store_true",
        help="the scans are already skull-stripped: register the whole image, mask = its foreground",
    )
    strip.add_argument(
        "--brain-mask",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="brain masks, one per scan in order (skips the atlas skull stripping)",
    )
    parser.add_argument(
        "--masks",
        nargs="+",
        type=Path,
        metavar="MASK",
        help="other masks to bring along (e.g. lesion masks), one per scan in order: written as "
        "<name>_mask.nii.gz on the output grid (linear, > 0.4)",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="tighten the atlas brain mask on T1 scans (drop dark CSF/bone and bright fat at its rim)",
    )
    parser.add_argument(
        "--transform",
        choices=("affine", "similarity", "rigid"),
        default="affine",
        help="degrees of freedom (default affine: 12; similarity: 7; rigid: 6)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the metric's random sampling (default 0)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=run)
    return parser


def _scans(args: argparse.Namespace) -> list[Path]:
    from pseudohealthy.data.dataset import find_scans

    return find_scans(args.scans)


def _per_scan(paths: list[Path] | None, scans: list[Path], what: str, option: str) -> list[Path | None]:
    """One file per scan (or ``None`` for each when the option is not given); checked to exist."""
    if not paths:
        return [None] * len(scans)
    if len(paths) != len(scans):
        raise PseudohealthyError(
            f"{len(paths)} {what}(s) for {len(scans)} scan(s): give one per scan ({option})"
        )
    for path in paths:
        if not path.is_file():
            raise ScanError(path, f"{what} not found")
    return list(paths)


def outputs_for(out_dir: Path, name: str) -> tuple[Path, Path, Path]:
    """``(<name>_preprocessed.nii.gz, <name>_brainmask.nii.gz, <name>_transform.json)``."""
    return tuple(out_dir / f"{name}{suffix}" for suffix in SUFFIXES)  # type: ignore[return-value]


def _check_outputs(
    args: argparse.Namespace, scans: list[Path], names: list[str], masks: list[Path | None]
) -> None:
    """Refuse an unusable output folder, outputs onto inputs and (without --overwrite) existing
    outputs, before anything is computed."""
    check_output_dir(args.output)
    inputs = {p.resolve() for p in scans} | {m.resolve() for m in masks if m is not None}
    for name in names:
        extra = (args.output / f"{name}{MASK_SUFFIX}",) if args.masks else ()
        for path in (*outputs_for(args.output, name), *extra):
            if path.resolve() in inputs:
                raise ScanError(path, "refusing to overwrite an input; choose another output folder")
            if path.exists() and not args.overwrite:
                raise ScanError(path, "already exists (use --overwrite to replace it)")


def _strip_label(args: argparse.Namespace, mask_given: bool) -> str:
    if mask_given:
        return "brain mask given"
    if args.no_skull_strip:
        return "none (already skull-stripped; mask = foreground)"
    return "atlas mask, refined" if args.refine else "atlas mask"


def record_result(
    result, volume, template, scan_path: Path, args: argparse.Namespace, mask_given: bool
) -> None:
    """Add provenance (input, template, output grid, brain volume) to the transform's record."""
    import numpy as np

    voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000.0
    result.transform.info.update(
        {
            "scan": str(scan_path),
            "template": template.source,
            "space": args.space,
            "skull_strip": _strip_label(args, mask_given),
            "output_shape": list(result.like.shape),
            "output_affine": [[round(float(v), 6) for v in row] for row in result.like.source_affine],
            "brain_ml": round(float(result.native_mask.sum()) * voxel_ml, 1),
        }
    )


def _preprocess_one(
    scan_path: Path,
    name: str,
    mask_path: Path | None,
    other_path: Path | None,
    template,
    settings,
    args: argparse.Namespace,
) -> Path:
    """Register, skull-strip and write one scan's outputs (all or none); returns the image path."""
    from pseudohealthy.data import registration as reg
    from pseudohealthy.data.io import load_mask, load_scan, save_like

    volume = load_scan(scan_path)
    brain = load_mask(mask_path, volume) if mask_path is not None else None
    other = load_mask(other_path, volume) if other_path is not None else None
    result = reg.preprocess_scan(
        volume,
        template,
        space=args.space,
        skull_strip=not args.no_skull_strip,
        brain_mask=brain,
        refine=args.refine,
        voxel_size=args.voxel_size,
        settings=settings,
    )
    image_path, mask_out, transform_path = outputs_for(args.output, name)
    overwrite = args.overwrite
    with OutputSet() as out:
        out.write(image_path, save_like, result.image, result.like, image_path, overwrite=overwrite)
        out.write(mask_out, save_like, result.mask, result.like, mask_out, dtype="uint8", overwrite=overwrite)
        if other is not None:
            carried = reg.carry_mask(other, volume, result)
            other_out = args.output / f"{name}{MASK_SUFFIX}"
            out.write(
                other_out, save_like, carried, result.like, other_out, dtype="uint8", overwrite=overwrite
            )
            result.transform.info["mask"] = {"source": str(other_path), "output": other_out.name}
        record_result(result, volume, template, scan_path, args, brain is not None)
        out.write(transform_path, result.transform.save, transform_path, overwrite=overwrite)
    if not getattr(args, "quiet", False):
        from tqdm import tqdm

        s = result.transform.summary()
        tqdm.write(
            f"{name}: scales {s['scales']}, rotation {s['rotation_deg']} deg, "
            f"{result.transform.info.get('seconds', 0):.1f} s -> {image_path}"
        )
    return image_path


def run(args: argparse.Namespace) -> int:
    """Preprocess every scan; a failing scan is reported in one line and the rest go on.

    Returns 0, or 2 after a count when any scan failed.
    """
    from tqdm import tqdm

    from pseudohealthy.data import registration as reg

    quiet = bool(getattr(args, "quiet", False))
    if args.voxel_size is not None and args.space != "mni":
        raise PseudohealthyError("--voxel-size applies to --space mni only")
    if args.voxel_size is not None and not 0.25 <= args.voxel_size <= 10:
        raise PseudohealthyError(f"--voxel-size must be 0.25..10 mm, got {args.voxel_size:g}")
    if args.refine and (args.no_skull_strip or args.brain_mask):
        raise PseudohealthyError("--refine tightens the atlas brain mask; it does not apply with this option")
    check_output_dir(args.output)
    scans = _scans(args)
    masks = _per_scan(args.brain_mask, scans, "brain mask", "--brain-mask")
    others = _per_scan(args.masks, scans, "mask", "--masks")
    names = output_names(scans)
    _check_outputs(args, scans, names, [*masks, *others])
    reg.backend()  # a missing SimpleITK is reported before any work
    template = reg.load_template(args.template, args.template_mask)
    settings = reg.RegistrationSettings(dof=args.transform, seed=args.seed)

    def echo(line: str) -> None:
        tqdm.write(line, file=sys.stderr)

    batch = Batch("preprocess", len(scans), debug=bool(getattr(args, "debug", False)), echo=echo)
    work = list(zip(scans, names, masks, others, strict=True))
    bar = tqdm(work, desc="preprocess", unit="scan", disable=quiet)
    for scan_path, name, mask_path, other_path in batch.each(bar):
        bar.set_postfix_str(name)
        with batch.attempt():
            _preprocess_one(scan_path, name, mask_path, other_path, template, settings, args)
    bar.close()
    if not quiet:
        done = batch.attempted - len(batch.failed)
        count = f"{done} of {len(scans)}" if done < len(scans) else f"{len(scans)}"
        print(f"{count} scan(s) preprocessed ({args.space} space) -> {args.output}")
    return batch.finish()
