"""Tumours, FLAIR: the conditioned ensemble vs a single conditioned model vs the unconditional baseline.

Run: ``.venv/bin/python benchmarks/protocol_brats.py [--out DIR] [--folds 2,6,9|all] [--steps N]
[--preset cpu] [--ensemble-dir RUN] [--baseline-dir RUN] [--tiny]`` (needs the shared data in
``../shared/data``). One command; every step is a ``pseudohealthy`` command (printed, timed and
recorded in ``results.json``).

Split (patient level, fixed; the weakly supervised protocol of Wolleb et al.):
- train: the lesion-free axial slices (no ``OTMultiClass`` voxel > 0) of BraTS 2013 patients
  ``pat0003``, ``pat0004``, ``pat0005`` (``Flair_subtrMeanDivStd``, brain masks beside them);
- test: all axial slices with brain (>= 1% of the slice) of patient ``pat0006``, FLAIR, any tumour
  label > 0 = anomaly. Nothing is tuned on pat0006.

Arms, all in the same harness, on the same test slices, with the same sampler and seed:
(a) ``ensemble``: the image-conditioned ensemble (folds ``--folds``, default 2,6,9 on the CPU);
(b) ``single``: one conditioned model, the ensemble's first member (``restore --members``);
(c) ``baseline``: the unconditional reconstruction baseline (preset ``<preset>-baseline``, one
    model, fold = the first of ``--folds``), restored by partial noising to ``--t-start``
    (default: restore's, 250) and denoising without a condition.

Steps: ``pseudohealthy train`` the ensemble and the baseline (skipped when ``--ensemble-dir`` /
``--baseline-dir`` already hold trained members: those runs are reused as they are), then per arm
``pseudohealthy restore`` pat0006 (the selected slices) -> ``OUT/restore/<arm>/<patient>`` and
``pseudohealthy evaluate --restorations`` -> ``OUT/eval/<arm>`` (metrics.json with the intensity
baseline of Meissen et al.). Writes ``OUT/table.md`` (the arms, the intensity baseline and, for
orientation only, the paper's Table 1 BraTS rows: different data), ``OUT/results.json`` and
``OUT/figure.png`` (test slices: input, lesion, restoration and map per arm).

``--tiny``: the whole chain in about a minute (tiny preset, 2 folds, a few training steps, 2 DDIM
steps, 3 slices, 64 px): a smoke test, not a result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _arms import TestScan, add_arm_arguments, compare, tiny_settings, train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_PATIENTS = ("brats_2013_pat0003_1", "brats_2013_pat0004_1", "brats_2013_pat0005_1")
TEST_PATIENT = "brats_2013_pat0006_1"
SCAN = "Flair_subtrMeanDivStd.nii.gz"
LESION = "OTMultiClass.nii.gz"
BRAIN = "brainmask.nii.gz"
# Table 1 of Baugh et al. (UNSURE 2024), ensemble of 10, trained on CamCAN, tested on BraTS 2020.
PAPER_ROWS = {
    "paper Table 1, BraTS-T2 (different data)": {
        "ap_image": 0.89,
        "auroc": 0.88,
        "ap_pixel": 0.74,
        "best_dice": 0.69,
    },
    "paper Table 1, BraTS-T1 (different data)": {
        "ap_image": 0.75,
        "auroc": 0.77,
        "ap_pixel": 0.30,
        "best_dice": 0.36,
    },
}


def training_data(brats_dir: Path) -> list[str]:
    """``pseudohealthy train`` arguments: the lesion-free FLAIR slices of the training patients."""
    data = [str(brats_dir / p) for p in TRAIN_PATIENTS]
    return [*data, "--include", "*Flair*", "--lesion-masks-pattern", LESION, "--modality", "FLAIR"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/protocol_brats"), help="work folder")
    parser.add_argument(
        "--brats-dir", type=Path, default=SHARED / "lesion/brats2013", help="BraTS 2013 patients"
    )
    add_arm_arguments(parser, folds="2,6,9")
    args = parser.parse_args(argv)
    if args.tiny:
        tiny_settings(args, folds="2,6" if args.folds in ("2,6,9", "all") else args.folds)
    for p in (*TRAIN_PATIENTS, TEST_PATIENT):
        if not (args.brats_dir / p / SCAN).is_file():
            raise SystemExit(f"BraTS scan not found: {args.brats_dir / p / SCAN}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    t0 = time.perf_counter()
    first_fold = "0" if args.folds == "all" else args.folds.split(",")[0].strip()
    data = training_data(args.brats_dir)

    print(f"[1/4] train the conditioned ensemble ({args.preset}, folds {args.folds})", flush=True)
    ens_dir = args.ensemble_dir or out / "ensemble"
    train(args, ens_dir, args.preset, args.folds, data, log, given=bool(args.ensemble_dir))
    print(f"[2/4] train the unconditional baseline ({args.preset}-baseline, fold {first_fold})", flush=True)
    base_dir = args.baseline_dir or out / "baseline"
    train(args, base_dir, f"{args.preset}-baseline", first_fold, data, log, given=bool(args.baseline_dir))

    folder = args.brats_dir / TEST_PATIENT
    results = compare(
        args,
        tests=[TestScan(folder / SCAN, folder / LESION, folder / BRAIN)],
        ens_dir=ens_dir,
        base_dir=base_dir,
        out=out,
        log=log,
        protocol={
            "name": "BraTS 2013 FLAIR: train lesion-free slices of pat0003-0005, test all slices of pat0006",
            "split": {"train": list(TRAIN_PATIENTS), "test": [TEST_PATIENT]},
            "test": f"{TEST_PATIENT} (FLAIR)",
            "train": f"lesion-free slices of {', '.join(TRAIN_PATIENTS)}",
        },
        paper_rows=PAPER_ROWS,
        modality="FLAIR",
        started=t0,
    )
    done = f"protocol done in {results['seconds']} s; table -> {out / 'table.md'}"
    print(f"{done}, figure -> {results['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
