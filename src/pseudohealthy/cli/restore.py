"""`pseudohealthy restore`: pseudo-healthy restorations and anomaly maps of scans (NIfTI + JSON)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pseudohealthy.cli.batch import (
    Batch,
    OutputSet,
    add_sampler_arguments,
    add_scans_argument,
    check_output_dir,
    output_names,
    restore_settings,
)
from pseudohealthy.engine.defaults import BASELINE_T_START, COMPILE_MODES
from pseudohealthy.errors import PseudohealthyError, ScanError


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``restore`` subcommand."""
    parser = subparsers.add_parser(
        "restore",
        help="restore scans to pseudo-healthy tissue with an ensemble and write anomaly maps",
        description=(
            "Restore every foreground axial slice of each SCAN (NIfTI files, DICOM series folders "
            "(FOLDER::SERIES picks one of several), or folders of them) "
            "with every member of an ensemble and write, in the scan's own geometry, "
            "<name>_pseudohealthy.nii.gz (original intensity units), <name>_anomaly.nii.gz "
            "(ensemble 1 - SSIM map, 0 outside the restored foreground), <name>_uncertainty.nii.gz "
            "(the members' disagreement: per-voxel standard deviation of their 1 - SSIM maps, 0 "
            "outside the restored foreground and everywhere for a one-member ensemble), "
            "<name>_preview.png (the top-scoring slices: input, pseudo-healthy, map, uncertainty; "
            "radiological view, edges labelled R/L/A/P) and <name>_restore.json "
            "(scores, per-slice scores and uncertainties, seeds, settings, timings, members). "
            "Inputs that share a file name (a/FLAIR.nii.gz, b/FLAIR.nii.gz) are named after their "
            "folders too (a_FLAIR, "
            "b_FLAIR; printed, and the input path is in <name>_restore.json). Each failing scan is "
            "reported in one line and the others go on; the exit status is then 2, after a count. "
            "A scan's outputs appear together or not at all; nothing existing is replaced without "
            "--overwrite, and the output folder is checked before any scan is restored."
        ),
    )
    add_scans_argument(parser)
    parser.add_argument(
        "--ensemble",
        type=Path,
        required=True,
        help="ensemble folder (or one checkpoint), or the name of a bundled ensemble: demo "
        "(see pseudohealthy sample)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (created)")
    add_sampler_arguments(parser)
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="torch.compile the members (reduce-overhead: also CUDA graphs); for GPUs: "
        "no gain measured on the CPU, and compiling takes minutes there (default: off)",
    )
    parser.add_argument("--members", help="comma-separated member names to use (default: all)")
    parser.add_argument("--brain-mask", type=Path, help="brain mask NIfTI (default: voxels above background)")
    parser.add_argument(
        "--member-maps", action="store_true", help="also write <name>_anomaly_<member>.nii.gz"
    )
    parser.add_argument(
        "--slices",
        help="axial slices (canonical RAS+ index) to restore: 40:60 (end excluded), 45, or 10:20,45 "
        "(default: all slices with foreground)",
    )
    parser.add_argument(
        "--t-start",
        type=int,
        help=f"partial-noising depth (default: {BASELINE_T_START} for an unconditioned ensemble, "
        "pure noise otherwise)",
    )
    parser.add_argument(
        "--lesion-mask", type=Path, help="lesion mask NIfTI, outlined in the preview (one scan only)"
    )
    parser.add_argument(
        "--no-preview", action="store_true", help="do not write <name>_preview.png (top-scoring slices)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.set_defaults(func=run)
    return parser


def parse_slices(spec: str | None, n_z: int) -> list[int] | None:
    """``"40:60,70"`` -> ``[40, ..., 59, 70]`` (ranges end-exclusive, clipped to ``0..n_z``)."""
    if spec is None:
        return None
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                lo, hi = (s.strip() for s in part.split(":", 1))
                out.extend(range(*slice(int(lo) if lo else None, int(hi) if hi else None).indices(n_z)))
            else:
                out.append(int(part))
        except ValueError:
            raise PseudohealthyError(
                f"--slices: cannot read {part!r} (use e.g. 40:60, 45 or 10:20,45)"
            ) from None
    if not out:
        raise PseudohealthyError(f"--slices {spec!r} selects no slice")
    return out


def _is_output(path: Path) -> bool:
    from pseudohealthy.data.io import scan_name

    name = scan_name(path)
    from pseudohealthy.engine.outputs import MEMBER_MAP_INFIX, output_stems

    return name.endswith(output_stems()) or MEMBER_MAP_INFIX in name


def _folder_scans(path: Path) -> list[Path]:
    """The scans of a folder of scans: its NIfTI files (sorted, skipping this command's outputs
    and temporary files), then its subfolders that hold a DICOM series (one scan each)."""
    from pseudohealthy.data.io import is_dicom_folder, is_nifti_name

    entries = sorted(path.iterdir())
    found = [p for p in entries if p.is_file() and is_nifti_name(p) and not _is_output(p)]
    found += [p for p in entries if not p.name.startswith(".") and is_dicom_folder(p)]
    if not found:
        warning = f"pseudohealthy restore: warning: no NIfTI scans or DICOM series in folder {path}"
        print(warning, file=sys.stderr)
    return found


def collect_scans(paths: list[Path]) -> list[Path]:
    """Files as given; a folder holding a DICOM series (or ``folder::SERIES``) is ONE scan; other
    folders -> their scans (:func:`_folder_scans`); a scan given twice is kept once."""
    from pseudohealthy.data.io import is_dicom_folder

    scans: list[Path] = []
    for path in paths:
        if path.is_dir() and not is_dicom_folder(path):
            scans.extend(_folder_scans(path))
        else:
            scans.append(path)
    seen: set[Path] = set()
    unique = []
    for path in scans:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _same(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _outputs(out_dir: Path, name: str, members: list[str] | None, preview: bool = False) -> dict[str, Path]:
    from pseudohealthy.engine import outputs as names  # the one owner of the outputs' names

    outputs = {
        "pseudo_healthy": out_dir / f"{name}{names.PSEUDO_SUFFIX}",
        "anomaly": out_dir / f"{name}{names.ANOMALY_SUFFIX}",
        "uncertainty": out_dir / f"{name}{names.UNCERTAINTY_SUFFIX}",
    }
    for member in members or []:
        outputs[f"anomaly_{member}"] = out_dir / f"{name}{names.member_map_suffix(member)}"
    if preview:
        outputs["preview"] = out_dir / f"{name}{names.PREVIEW_SUFFIX}"
    outputs["json"] = out_dir / f"{name}{names.RECORD_SUFFIX}"
    return outputs


def _check_outputs(outputs: dict[str, Path], inputs: list[Path], written: set[Path], overwrite: bool) -> None:
    for path in outputs.values():
        if any(_same(path, src) for src in inputs):
            raise ScanError(path, "refusing to write onto an input file")
        if path.resolve() in written:
            raise ScanError(path, "another scan of this run has the same name and already wrote it")
        if path.exists() and not overwrite:
            raise ScanError(path, "already exists (use --overwrite to replace it)")


def _json_default(value: Any) -> Any:
    """numpy scalars as Python numbers, anything else as text (for ``restore.json``)."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "shape", None) == () else str(value)


def _progress_bar(name: str, quiet: bool):
    """A tqdm bar in slices (fractional while a batch denoises) and its update callback."""
    from tqdm import tqdm

    bar = tqdm(desc=name, total=0, unit="slice", disable=quiet, leave=False, bar_format=None)

    def update(p) -> None:
        if bar.total != p.slices_total:
            bar.reset(total=p.slices_total)
        bar.n = round(p.done / max(p.total, 1) * p.slices_total, 2)
        bar.refresh()

    return bar, update


def restore_scan(
    path: Path,
    ensemble,
    settings,
    args: argparse.Namespace,
    inputs: list[Path],
    written: set[Path],
    name: str | None = None,
) -> dict[str, Any]:
    """Restore one scan and write its outputs, named ``name`` (default: the scan's file name).

    The outputs are written whole or not at all (:class:`~pseudohealthy.cli.batch.OutputSet`,
    the JSON record last); returns the record.
    """
    import numpy as np

    from pseudohealthy import __version__
    from pseudohealthy.data.files import write_json
    from pseudohealthy.data.io import load_mask, load_scan, save_like, scan_exists, scan_name
    from pseudohealthy.engine.maps import format_score
    from pseudohealthy.engine.restore import restore_volume

    quiet = bool(getattr(args, "quiet", False))
    if not scan_exists(path):
        raise ScanError(path, "file not found")
    name = name or scan_name(path)
    preview = not getattr(args, "no_preview", False)
    outputs = _outputs(Path(args.output), name, ensemble.names if args.member_maps else None, preview)
    _check_outputs(outputs, inputs, written, args.overwrite)
    volume = load_scan(path)
    brain = load_mask(args.brain_mask, volume) if args.brain_mask else None
    lesion = load_mask(args.lesion_mask, volume) if getattr(args, "lesion_mask", None) else None
    slices = parse_slices(args.slices, volume.shape[2])
    bar, update = _progress_bar(volume.name, quiet)
    try:
        result = restore_volume(volume, ensemble, settings, slices=slices, brain_mask=brain, progress=update)
    finally:
        bar.close()
    if not result.restored:
        raise ScanError(path, f"none of the requested slices ({args.slices}) has foreground")

    overwrite = args.overwrite
    uncertainty = result.uncertainty if result.uncertainty is not None else np.zeros_like(result.anomaly)
    with OutputSet() as out:
        volumes = (
            ("pseudo_healthy", result.pseudo_healthy),
            ("anomaly", result.anomaly),
            ("uncertainty", uncertainty),
        )
        for key, array in volumes:
            out.write(outputs[key], save_like, array, volume, outputs[key], overwrite=overwrite)
        if args.member_maps:
            for m, member in enumerate(result.members):
                target = outputs[f"anomaly_{member}"]
                out.write(target, save_like, result.member_maps[m], volume, target, overwrite=overwrite)
        if preview:
            from pseudohealthy.figures.preview import highest_scoring, save_preview

            out.write(
                outputs["preview"],
                save_preview,
                outputs["preview"],
                volume.data,
                result.pseudo_healthy,
                result.anomaly,
                highest_scoring(result.slice_scores, 4),
                lesion=lesion,
                uncertainty=uncertainty,
                title=f"{name}: volume score {format_score(result.volume_score)}",
                spacing=volume.spacing[:2],
            )
        record = {
            "scan": str(path),
            "name": name,
            "package_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "brain_mask": str(args.brain_mask) if args.brain_mask else None,
            **result.record.to_dict(),
            "outputs": {k: str(v) for k, v in outputs.items()},
        }
        out.write(outputs["json"], write_json, outputs["json"], record, default=_json_default)
    written.update(p.resolve() for p in outputs.values())
    if not quiet:
        print(
            f"{name}: {len(result.restored)} slice(s), score {format_score(result.volume_score)}, "
            f"{result.timings['total_s']:.1f} s -> {outputs['anomaly']}"
        )
    return record


def run(args: argparse.Namespace) -> int:
    """Restore every scan; a bad scan is reported in one line and the rest go on.

    The output folder is checked first (before the ensemble is read or anything restored).
    Returns 0, or 2 after a count when any scan failed.
    """
    from pseudohealthy.data.sample import resolve_ensemble
    from pseudohealthy.device import describe_precision, resolve_device
    from pseudohealthy.model.checkpoint import Ensemble

    check_output_dir(args.output)
    settings = restore_settings(
        args,
        device=str(resolve_device(args.device)),
        keep_member_maps=args.member_maps,
        t_start=args.t_start,
        compile=args.compile,
    ).validate()
    if not getattr(args, "quiet", False):
        print(describe_precision(settings.device, settings.precision), file=sys.stderr)
    scans = collect_scans(list(args.scans))
    if not scans:
        raise PseudohealthyError("no scans to restore")
    if getattr(args, "lesion_mask", None) and len(scans) != 1:
        raise PseudohealthyError("--lesion-mask needs exactly one scan")
    ensemble = Ensemble.from_dir(resolve_ensemble(args.ensemble))
    if args.members:
        ensemble = ensemble.select([m.strip() for m in args.members.split(",") if m.strip()])
    names = output_names(scans)
    inputs = [*scans, *([args.brain_mask] if args.brain_mask else [])]
    if getattr(args, "lesion_mask", None):
        inputs.append(args.lesion_mask)
    written: set[Path] = set()
    batch = Batch("restore", len(scans), debug=bool(getattr(args, "debug", False)))
    for path, name in batch.each(zip(scans, names, strict=True)):
        with batch.attempt():
            restore_scan(path, ensemble, settings, args, inputs, written, name)
    return batch.finish()
