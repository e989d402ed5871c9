"""`pseudohealthy train`: train ensemble members (one per fold) on healthy scans."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

from pseudohealthy.cli.batch import add_precision_argument
from pseudohealthy.cli.synth import add_task_style_argument
from pseudohealthy.data.norms import NORMS
from pseudohealthy.errors import PseudohealthyError, ScanError

log = logging.getLogger("pseudohealthy.training")

# CLI option -> TrainConfig field
_FIELDS = {
    "steps": "steps",
    "batch_size": "batch_size",
    "lr": "lr",
    "size": "size",
    "workers": "num_workers",
    "seed": "seed",
    "val_every": "val_every",
    "ckpt_every": "ckpt_every",
    "early_stop": "early_stop_patience",
    "modality": "modality",
    "inter_dir": "inter_dir",
    "norm": "norm",
    "precision": "precision",
    "val_fraction": "val_fraction",
    "log_every": "log_every",
    "step_delay": "step_delay",
    "prediction": "prediction",
    "zero_snr": "zero_snr",
    "centred": "centred",
    "init_from": "init_from",
    "init_seed": "init_seed",
    "val_start": "val_start",
    "val_fresh": "val_fresh",
    "task_style": "task_style",
    "intensity_gamma": "intensity_gamma",
}
_PER_FOLD = "fold"  # --init-seed fold: initialise each fold from its own member seed
_NOT_FROM_SAVED = ("device", "quiet", "step_delay", "num_workers")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train",
        help="train ensemble members on healthy scans (one per fold of the synthetic tasks)",
        description=(
            "Train image-conditioned diffusion models on the foreground axial slices of healthy "
            "scans, corrupted on the fly with the fold's 3 synthetic training tasks. Each fold K "
            "is written to RUN_DIR/fold_K (model.safetensors + pseudohealthy.json, log.csv, "
            "train_state/); RUN_DIR is then an ensemble for 'pseudohealthy restore'. Folds can be "
            "spread over machines with --fold; several GPUs or nodes: launch with torchrun."
        ),
    )
    parser.add_argument(
        "data", nargs="+", type=Path, metavar="DATA", help="NIfTI scans or folders (searched recursively)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="RUN_DIR", help="run folder")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--fold", type=int, help="train one member, fold K (0-9)")
    which.add_argument("--folds", help="'all' (default: the 10-member ensemble) or a list such as 0,3,5")
    parser.add_argument("--preset", help="model preset (default: 'paper' with CUDA, 'cpu' without)")
    parser.add_argument("--steps", type=int, help="maximum training steps (default: per preset)")
    parser.add_argument("--batch-size", type=int, help="batch size per GPU/process (default 16)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--size", type=int, help="slice size of the model (default: the preset's)")
    parser.add_argument("--workers", type=int, help="data-loader worker processes (default: automatic)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add_precision_argument(parser, unset=True)
    parser.add_argument("--val-every", type=int, help="validate every N steps (0: never)")
    parser.add_argument("--ckpt-every", type=int, help="write the resumable state every N steps")
    parser.add_argument(
        "--early-stop", type=int, metavar="N", help="stop after N steps without improvement (0: off)"
    )
    parser.add_argument("--val-fraction", type=float, help="held-out fraction of the slices (default 0.05)")
    parser.add_argument("--log-every", type=int, help="log the mean training loss every N steps (default 50)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue interrupted folds; extend finished ones whose state stops short of --steps",
    )
    parser.add_argument("--modality", help="recorded in the members (e.g. T1, T2, FLAIR; default unknown)")
    parser.add_argument(
        "--brain-mask-pattern",
        help="brain mask beside each scan, e.g. '{stem}_brainmask.nii.gz' (default: a sibling "
        "brainmask.nii.gz when present; 'none' to ignore)",
    )
    parser.add_argument(
        "--lesion-masks-pattern",
        help="lesion mask beside each scan, e.g. 'OTMultiClass.nii.gz' or '{stem}_seg.nii.gz': "
        "slices with any lesion voxel are left out (training on lesion-free slices of patients)",
    )
    parser.add_argument(
        "--lesion-masks", nargs="+", type=Path, metavar="MASK", help="lesion masks, one per scan, in order"
    )
    parser.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="skip matching files")
    parser.add_argument("--include", action="append", default=[], metavar="GLOB", help="only matching files")
    parser.add_argument("--inter-dir", type=Path, help="images of another modality for poisson_inter")
    parser.add_argument("--norm", choices=NORMS, help=f"intensity normalisation (default {NORMS[0]})")
    _add_model_options(parser)
    add_task_style_argument(parser)  # not given: the resumed run's style, else the default
    parser.add_argument("--step-delay", type=float, help=argparse.SUPPRESS)  # testing aid
    parser.set_defaults(func=run)
    return parser


def _init_seed(text: str) -> int | str:
    if text.strip().lower() == _PER_FOLD:
        return _PER_FOLD
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or '{_PER_FOLD}', got {text!r}") from None


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    """The diffusion target, model range, initial weights and validation protocol options."""
    parser.add_argument(
        "--prediction", help="what the network predicts: epsilon (default, the reference's), v or sample"
    )
    parser.add_argument(
        "--intensity-gamma",
        type=float,
        metavar="A",
        help="intensity augmentation: each training slice and its condition raised to exp(U(-A, A)) "
        "(default 0: none, the reference's)",
    )
    parser.add_argument(
        "--zero-snr",
        action="store_true",
        default=None,
        help="rescale the noise schedule to a zero terminal SNR (needs --prediction v or sample)",
    )
    parser.add_argument(
        "--centred",
        action="store_true",
        default=None,
        help="model range [-1, 1], as older pseudohealthy checkpoints (default: [0, 1], the reference's)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        metavar="MEMBER_DIR",
        help="start from the weights of a trained member (same architecture, prediction and range)",
    )
    parser.add_argument(
        "--init-seed",
        type=_init_seed,
        metavar="N|fold",
        help="seed of the network initialisation, shared by all folds (default 42, the reference's); "
        "'fold': each fold its own",
    )
    parser.add_argument(
        "--val-start", type=int, metavar="STEP", help="no validation before STEP (default: per preset)"
    )
    parser.add_argument(
        "--val-fresh",
        action=argparse.BooleanOptionalAction,
        help="corrupt the held-out slices afresh at every validation (default: per preset)",
    )


def parse_folds(fold: int | None, folds: str | None) -> list[int]:
    """The folds to train: ``--fold K``, ``--folds all`` or ``--folds 0,3,5`` (default all)."""
    if fold is not None:
        if not 0 <= fold <= 9:
            raise PseudohealthyError(f"--fold must be 0-9, got {fold}")
        return [fold]
    if folds is None or folds.strip().lower() == "all":
        return list(range(10))
    out = []
    for part in folds.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 <= int(part) <= 9:
            raise PseudohealthyError(f"--folds must be 'all' or folds 0-9 separated by commas, got {folds!r}")
        out.append(int(part))
    return list(dict.fromkeys(out))


def _auto_workers(device_type: str) -> int:
    import os

    cores = os.cpu_count() or 1
    if cores <= 2:
        return 0
    return min(8, cores - 1) if device_type == "cuda" else min(2, cores // 2)


def _lesion_masks(args: argparse.Namespace, scans: list) -> list[Path | None] | None:
    from pseudohealthy.data.dataset import companion_path

    if args.lesion_masks and args.lesion_masks_pattern:
        raise PseudohealthyError("give lesion masks either with --lesion-masks or --lesion-masks-pattern")
    if args.lesion_masks:
        if len(args.lesion_masks) != len(scans):
            raise PseudohealthyError(f"{len(args.lesion_masks)} lesion masks for {len(scans)} scans")
        return list(args.lesion_masks)
    if args.lesion_masks_pattern:
        masks = [companion_path(scan, args.lesion_masks_pattern) for scan, _ in scans]
        for scan_mask, (scan, _) in zip(masks, scans, strict=True):
            if not scan_mask.is_file():
                raise ScanError(scan_mask, f"lesion mask for {scan.name} not found")
        return masks
    return None


def _config(args: argparse.Namespace, folds: list[int], device_type: str) -> Any:
    """TrainConfig from: options given > the settings of a run being resumed > preset defaults."""
    from pseudohealthy.training.config import TrainConfig, member_dir
    from pseudohealthy.training.state import read_saved_config

    given = {field: getattr(args, opt) for opt, field in _FIELDS.items() if getattr(args, opt) is not None}
    for name in ("inter_dir", "init_from"):
        if name in given:
            given[name] = str(given[name].resolve() if name == "init_from" else given[name])
    if given.get("init_seed") == _PER_FOLD:
        given["init_seed"] = None
    saved: dict[str, Any] = {}
    if args.resume:
        for fold in folds:
            saved = read_saved_config(member_dir(args.output, fold)) or {}
            if saved:
                break
    preset = args.preset or saved.get("preset") or ("paper" if device_type == "cuda" else "cpu")
    if not args.preset:
        why = "as the run being resumed" if saved.get("preset") else f"{device_type} device"
        log.info("model preset: %s (%s; choose with --preset)", preset, why)
    values = (
        {k: v for k, v in saved.items() if k not in _NOT_FROM_SAVED} if saved.get("preset") == preset else {}
    )
    values.pop("fold", None)
    if "betas" in values:
        values["betas"] = tuple(values["betas"])
    values.update(given)
    values["device"] = args.device
    values["quiet"] = bool(getattr(args, "quiet", False))
    if "num_workers" not in values:
        values["num_workers"] = _auto_workers(device_type)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig.for_preset(
        preset, **{k: v for k, v in values.items() if k in known and k != "preset"}
    )
    config.validate()
    return config


def _check_outputs(args: argparse.Namespace, folds: list[int]) -> None:
    from pseudohealthy.model.checkpoint import is_checkpoint_dir
    from pseudohealthy.training.config import TRAINED_HINT, member_dir
    from pseudohealthy.training.state import LATEST, STATE_DIR

    if args.resume:
        return
    for fold in folds:
        folder = member_dir(args.output, fold)
        if is_checkpoint_dir(folder):
            raise PseudohealthyError(f"{folder}: fold {fold} is already trained ({TRAINED_HINT})")
        if (folder / STATE_DIR / LATEST).is_file():
            raise PseudohealthyError(f"{folder}: fold {fold} was interrupted (use --resume to continue it)")


def run(args: argparse.Namespace) -> int:
    """Load the data once, then train each fold; returns 0."""
    from pseudohealthy.data.dataset import HealthySlices, collect_training_scans
    from pseudohealthy.training.distributed import init_distributed
    from pseudohealthy.training.loop import check_init_source, train_ensemble

    folds = parse_folds(args.fold, args.folds)
    dist_info, device = init_distributed(args.device)
    config = _config(args, folds, device.type)
    check_init_source(config)
    _check_outputs(args, folds)
    scans = collect_training_scans(
        args.data, args.brain_mask_pattern, exclude=args.exclude, include=args.include
    )
    lesions = _lesion_masks(args, scans)
    quiet = config.quiet or not dist_info.is_main
    if not quiet:
        log.info("%d scan(s) found; preparing %d px slices", len(scans), config.image_size)
    data = HealthySlices.from_scans(
        scans,
        size=config.image_size,
        norm=config.norm,
        square=config.square,
        exclude_masks=lesions,
        val_fraction=config.val_fraction,
        seed=config.seed,
        progress=not quiet,
    )
    if not quiet:
        s = data.summary()
        log.info(
            "%d slices from %d volume(s): %d for training, %d held out%s",
            s["n_slices"],
            s["n_volumes"],
            s["n_train_slices"],
            s["n_val_slices"],
            f"; {s['n_excluded_slices']} lesion slices left out" if lesions else "",
        )
    try:
        members = train_ensemble(data, args.output, config, folds, resume=args.resume)
    finally:
        import torch.distributed as dist

        if dist_info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    if not quiet:
        print(f"{len(members)} member(s) in {args.output}: {', '.join(p.name for p in members)}")
    return 0
