"""Multiple sclerosis, T1: train on healthy IXI T1 scans, test on the MSLUB patients.

Run: ``.venv/bin/python benchmarks/protocol_mslub.py [--out DIR] [--folds all] [--steps N]
[--preset cpu] [--tiny]`` (needs ``pip install 'pseudohealthy[preprocess]'`` and the shared data
in ``../shared/data``). One command, three steps, each a ``pseudohealthy`` command (printed):

1. ``pseudohealthy preprocess`` the raw IXI T1 scans (whole head, PSR) into the MNI frame
   (skull-stripped with the bundled template's brain mask, tightened with ``--refine`` so that
   it resembles MSLUB's skull stripping; affine; 2 mm) -> ``OUT/ixi_mni``; scans already there
   are reused.
2. ``pseudohealthy train`` an ensemble on them (T1; ``--resume``, so finished folds are reused)
   -> ``OUT/ensemble``.
3. ``pseudohealthy evaluate`` on the MSLUB patients 07 and 19 (T1, consensus lesion masks), with
   the intensity baseline inverted (lesions are dark in T1) -> ``OUT/eval`` (metrics.json, curves,
   ``table.txt``). ``--test-frame preprocessed`` (default): the MSLUB T1 scans (already
   skull-stripped, rigidly in MNI space, so their brains are smaller than the template's) are
   first registered with ``pseudohealthy preprocess --no-skull-strip`` into the same affine frame
   as the training scans, their lesion masks carried along (``--masks``); ``shipped``: evaluated
   as distributed (the benchmark's frame).

``--tiny``: the whole chain in about a minute (2 IXI scans, the tiny preset, 1 fold, a few
training steps, 2 DDIM steps, 3 slices per patient): a smoke test, not a result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _steps import run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PATIENTS = ("patient07", "patient19")


def preprocess_ixi(args: argparse.Namespace, out: Path, log: list[dict]) -> Path:
    scans = sorted(p for p in args.ixi_dir.glob("*.nii*"))[: args.n_ixi]
    if not scans:
        raise SystemExit(f"no IXI scans in {args.ixi_dir}")
    todo = [s for s in scans if not (out / f"{s.name.split('.nii')[0]}_preprocessed.nii.gz").is_file()]
    print(f"[1/3] preprocess {len(scans)} IXI T1 scans ({len(scans) - len(todo)} already done)", flush=True)
    if todo:
        run(["preprocess", *map(str, todo), "-o", str(out), *(["--refine"] if args.refine else [])], log)
    return out


def train(args: argparse.Namespace, data: Path, out: Path, log: list[dict]) -> Path:
    print(f"[2/3] train ({args.preset}, folds {args.folds}) -> {out}", flush=True)
    cmd = ["train", str(data), "-o", str(out), "--folds", args.folds, "--preset", args.preset]
    cmd += ["--modality", "T1", "--device", args.device, "--resume"]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.tiny:
        cmd += ["--batch-size", "4", "--val-every", "0", "--ckpt-every", "0", "--workers", "0"]
    run(cmd, log)
    return out


def test_set(
    args: argparse.Namespace, out: Path, log: list[dict]
) -> tuple[list[Path], list[Path], list[Path]]:
    """``(scans, lesion masks, brain masks)`` of the MSLUB patients in the chosen frame."""
    raw = [args.mslub_dir / p / "T1.nii.gz" for p in PATIENTS]
    lesions = [args.mslub_dir / p / "lesion_mask.nii.gz" for p in PATIENTS]
    if args.test_frame == "shipped":
        return raw, lesions, []
    scans, masks, brains = [], [], []
    print("      MSLUB T1 -> the training frame (registration only, already skull-stripped)", flush=True)
    for patient, scan, lesion in zip(PATIENTS, raw, lesions, strict=True):
        folder = out / patient
        done = folder / "T1_preprocessed.nii.gz"
        if not done.is_file():
            cmd = ["preprocess", str(scan), "-o", str(folder), "--no-skull-strip", "--masks", str(lesion)]
            run([*cmd], log)
        scans.append(done)
        masks.append(folder / "T1_mask.nii.gz")
        brains.append(folder / "T1_brainmask.nii.gz")
    return scans, masks, brains


def evaluate(args: argparse.Namespace, ensemble: Path, out: Path, log: list[dict]) -> str:
    print(f"[3/3] evaluate on MSLUB {', '.join(PATIENTS)} (T1, {args.test_frame} frame) -> {out}", flush=True)
    scans, masks, brains = test_set(args, out.parent / "mslub_mni", log)
    cmd = ["evaluate", "--scans", *map(str, scans), "--masks", *map(str, masks)]
    if brains:
        cmd += ["--brain-masks", *map(str, brains)]
    cmd += ["--ensemble", str(ensemble), "-o", str(out), "--overwrite", "--invert-baseline"]
    cmd += ["--sampler", args.sampler, "--steps", str(args.eval_steps), "--device", args.device]
    if args.slices_per_volume:
        cmd += ["--slices-per-volume", str(args.slices_per_volume)]
    if args.size:
        cmd += ["--size", str(args.size)]
    return run(cmd, log, capture=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/protocol_mslub"), help="work folder")
    parser.add_argument("--ixi-dir", type=Path, default=SHARED / "healthy/ixi_t1", help="raw IXI T1 scans")
    parser.add_argument("--mslub-dir", type=Path, default=SHARED / "lesion/mslub", help="MSLUB patients")
    parser.add_argument("--n-ixi", type=int, help="use the first N IXI scans (default all)")
    parser.add_argument("--folds", default="all", help="ensemble folds: 'all' or e.g. 0,3,5")
    parser.add_argument("--steps", type=int, help="training steps per fold (default: the preset's)")
    parser.add_argument("--preset", default="cpu", help="model preset (default cpu)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim", "dpm"))
    parser.add_argument("--eval-steps", type=int, default=50, help="sampling steps at test time (default 50)")
    parser.add_argument("--slices-per-volume", type=int, help="evaluate N slices per patient (quick runs)")
    parser.add_argument("--size", type=int, help="evaluation frame size (default: evaluate's, 128)")
    parser.add_argument(
        "--test-frame",
        choices=("preprocessed", "shipped"),
        default="preprocessed",
        help="MSLUB registered affinely like the training scans (default) or as distributed",
    )
    parser.add_argument(
        "--no-refine",
        dest="refine",
        action="store_false",
        help="keep the plain atlas brain mask of the IXI scans (default: --refine, tight like MSLUB's)",
    )
    parser.add_argument("--tiny", action="store_true", help="a one-minute smoke run of the whole chain")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n_ixi = args.n_ixi or 2
        args.preset = "tiny"
        args.steps = args.steps or 4
        args.folds = "0" if args.folds == "all" else args.folds
        args.sampler, args.eval_steps = "ddim", 2
        args.slices_per_volume = args.slices_per_volume or 3
        args.size = args.size or 64
        args.device = "cpu" if args.device == "auto" else args.device
    for folder in (args.ixi_dir, args.mslub_dir):
        if not folder.is_dir():
            raise SystemExit(f"data folder not found: {folder}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    t0 = time.perf_counter()
    data = preprocess_ixi(args, out / "ixi_mni", log)
    ensemble = train(args, data, out / "ensemble", log)
    table = evaluate(args, ensemble, out / "eval", log)
    (out / "eval" / "table.txt").write_text(table)
    summary = {
        "protocol": "train IXI T1 (preprocessed to MNI) -> test MSLUB T1 patients 07, 19",
        "test_frame": args.test_frame,
        "tiny": bool(args.tiny),
        "steps": log,
        "seconds": round(time.perf_counter() - t0, 1),
        "metrics": str(out / "eval" / "metrics.json"),
    }
    (out / "protocol.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"protocol done in {summary['seconds']} s; table -> {out / 'eval' / 'table.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
