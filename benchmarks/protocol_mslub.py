"""Multiple sclerosis, T1: the conditioned ensemble vs a single conditioned model vs the unconditional
baseline, trained on healthy IXI T1 scans and tested on the MSLUB patients.

Run: ``.venv/bin/python benchmarks/protocol_mslub.py [--out DIR] [--folds 2,6,9|all] [--steps N]
[--preset cpu] [--ensemble-dir RUN] [--baseline-dir RUN] [--tiny]`` (needs ``pip install
'pseudohealthy[preprocess]'`` and the shared data in ``../shared/data``). One command; every step
is a ``pseudohealthy`` command (printed, timed and recorded in ``results.json``):

1. ``pseudohealthy preprocess`` the raw IXI T1 scans (whole head, PSR) into the MNI frame
   (skull-stripped with the bundled template's brain mask, tightened with ``--refine`` so that
   it resembles MSLUB's skull stripping; affine; 2 mm) -> ``OUT/ixi_mni``; scans already there
   are reused.
2. ``pseudohealthy train`` the conditioned ensemble (folds ``--folds``) -> ``OUT/ensemble`` and the
   unconditional baseline (preset ``<preset>-baseline``, the first fold) -> ``OUT/baseline``
   (``--resume``: finished folds are kept; ``--ensemble-dir`` / ``--baseline-dir`` reuse runs).
3. The test set: MSLUB patients 07 and 19 (T1, consensus lesion masks). ``--test-frame
   preprocessed`` (default): their T1 scans (already skull-stripped, rigidly in MNI space, so
   their brains are smaller than the template's) are registered with ``pseudohealthy preprocess
   --no-skull-strip`` into the same affine frame as the training scans, lesion masks carried
   along (``--masks``) -> ``OUT/mslub_mni``; ``shipped``: evaluated as distributed.
4. Per arm (ensemble, single = its first member, baseline) ``pseudohealthy restore`` each patient
   -> ``OUT/restore/<arm>/<patient>`` and one ``pseudohealthy evaluate --restorations`` over both
   (pooled, with the intensity baseline inverted: lesions are dark in T1) -> ``OUT/eval/<arm>``.
   Writes ``OUT/table.md`` (the arms, the intensity baseline and, for orientation only, the
   paper's Table 1 T1 rows: different data), ``OUT/results.json`` and ``OUT/figure.png``.

The split is fixed: the 40 IXI scans (healthy) train, the 2 MSLUB patients test; nothing is tuned
on them. ``--tiny``: the whole chain in about two minutes (2 IXI scans, the tiny preset, 2 folds, a
few training steps, 2 DDIM steps, 3 slices per patient): a smoke test, not a result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import TestScan, add_arm_arguments, compare, tiny_settings, train
from _steps import run

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PATIENTS = ("patient07", "patient19")
# Table 1 of Baugh et al. (UNSURE 2024), ensemble of 10, trained on CamCAN T1: its T1 test sets.
PAPER_ROWS = {
    "paper Table 1, BraTS-T1 (different data)": {
        "ap_image": 0.75,
        "auroc": 0.77,
        "ap_pixel": 0.30,
        "best_dice": 0.36,
    },
    "paper Table 1, ATLAS T1 (different data)": {
        "ap_image": 0.55,
        "auroc": 0.75,
        "ap_pixel": 0.25,
        "best_dice": 0.34,
    },
}


def preprocess_ixi(args: argparse.Namespace, out: Path, log: list[dict]) -> Path:
    """Step 1: the raw IXI T1 scans into the MNI frame (``OUT/ixi_mni``); done scans are reused."""
    scans = sorted(p for p in args.ixi_dir.glob("*.nii*"))[: args.n_ixi]
    if not scans:
        raise SystemExit(f"no IXI scans in {args.ixi_dir}")
    todo = [s for s in scans if not (out / f"{s.name.split('.nii')[0]}_preprocessed.nii.gz").is_file()]
    print(f"[1/4] preprocess {len(scans)} IXI T1 scans ({len(scans) - len(todo)} already done)", flush=True)
    if todo:
        run(["preprocess", *map(str, todo), "-o", str(out), *(["--refine"] if args.refine else [])], log)
    return out


def test_set(args: argparse.Namespace, out: Path, log: list[dict]) -> list[TestScan]:
    """The MSLUB patients (T1, lesion mask, brain mask) in the chosen frame."""
    if args.test_frame == "shipped":
        return [
            TestScan(args.mslub_dir / p / "T1.nii.gz", args.mslub_dir / p / "lesion_mask.nii.gz")
            for p in PATIENTS
        ]
    print("      MSLUB T1 -> the training frame (registration only, already skull-stripped)", flush=True)
    tests = []
    for patient in PATIENTS:
        folder = out / patient
        done = folder / "T1_preprocessed.nii.gz"
        if not done.is_file():
            scan, lesion = (args.mslub_dir / patient / f for f in ("T1.nii.gz", "lesion_mask.nii.gz"))
            run(["preprocess", str(scan), "-o", str(folder), "--no-skull-strip", "--masks", str(lesion)], log)
        tests.append(TestScan(done, folder / "T1_mask.nii.gz", folder / "T1_brainmask.nii.gz"))
    return tests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/protocol_mslub"), help="work folder")
    parser.add_argument("--ixi-dir", type=Path, default=SHARED / "healthy/ixi_t1", help="raw IXI T1 scans")
    parser.add_argument("--mslub-dir", type=Path, default=SHARED / "lesion/mslub", help="MSLUB patients")
    parser.add_argument("--n-ixi", type=int, help="use the first N IXI scans (default all)")
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
    add_arm_arguments(parser, folds="2,6,9")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n_ixi = args.n_ixi or 2
        tiny_settings(args, folds="2,6" if args.folds in ("2,6,9", "all") else args.folds)
    for folder in (args.ixi_dir, args.mslub_dir):
        if not folder.is_dir():
            raise SystemExit(f"data folder not found: {folder}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    t0 = time.perf_counter()
    first_fold = "0" if args.folds == "all" else args.folds.split(",")[0].strip()
    data = [str(preprocess_ixi(args, out / "ixi_mni", log)), "--modality", "T1"]

    print(f"[2/4] train the ensemble ({args.preset}, folds {args.folds}) and the baseline", flush=True)
    ens_dir = args.ensemble_dir or out / "ensemble"
    train(args, ens_dir, args.preset, args.folds, data, log, given=bool(args.ensemble_dir))
    base_dir = args.baseline_dir or out / "baseline"
    train(args, base_dir, f"{args.preset}-baseline", first_fold, data, log, given=bool(args.baseline_dir))

    tests = test_set(args, out / "mslub_mni", log)
    results = compare(
        args,
        tests=tests,
        ens_dir=ens_dir,
        base_dir=base_dir,
        out=out,
        log=log,
        protocol={
            "name": f"MSLUB T1 ({args.test_frame} frame): train healthy IXI T1, test patients 07 and 19",
            "split": {"train": [f"IXI T1 ({args.n_ixi or 'all'} scans)"], "test": list(PATIENTS)},
            "test": f"MSLUB {', '.join(PATIENTS)} (T1, {args.test_frame} frame)",
            "train": f"healthy IXI T1 scans in {args.ixi_dir} ({args.n_ixi or 'all'})",
        },
        paper_rows=PAPER_ROWS,
        modality="T1",
        evaluate_options=["--invert-baseline"],
        started=t0,
    )
    done = f"protocol done in {results['seconds']} s; table -> {out / 'table.md'}"
    print(f"{done}, figure -> {results['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
