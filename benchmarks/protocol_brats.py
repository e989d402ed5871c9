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
``pseudohealthy restore`` pat0006 (the selected slices) -> ``OUT/restore/<arm>`` and
``pseudohealthy evaluate --restorations`` -> ``OUT/eval/<arm>`` (metrics.json with the intensity
baseline of Meissen et al.). Writes ``OUT/table.md`` (the arms, the intensity baseline and, for
orientation only, the paper's Table 1 BraTS rows: different data), ``OUT/results.json`` and
``OUT/figure.png`` (test slices: input, lesion, restoration and map per arm).

``--tiny``: the whole chain in about a minute (tiny preset, 2 folds, a few training steps, 2 DDIM
steps, 3 slices, 64 px): a smoke test, not a result.
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
TRAIN_PATIENTS = ("brats_2013_pat0003_1", "brats_2013_pat0004_1", "brats_2013_pat0005_1")
TEST_PATIENT = "brats_2013_pat0006_1"
SCAN = "Flair_subtrMeanDivStd.nii.gz"
LESION = "OTMultiClass.nii.gz"
BRAIN = "brainmask.nii.gz"
ARMS = ("ensemble", "single", "baseline")
COLUMNS = (("AP_i", "ap_image"), ("AUROC", "auroc"), ("AP_p", "ap_pixel"), ("[Dsc]", "best_dice"))
COLUMNS += (("Dice@5%FPR", "dice_at_5fpr"), ("n slices", "n_slices"))
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


def members(run_dir: Path) -> list[str]:
    """Names of the trained members in ``run_dir`` (sorted, as ``restore`` loads them)."""
    if (run_dir / "pseudohealthy.json").is_file():
        return [run_dir.name]
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if (p / "pseudohealthy.json").is_file())


def describe(run_dir: Path) -> list[dict]:
    """How each member of ``run_dir`` was trained; exits if one saw the test patient (leakage)."""
    found = []
    for name in members(run_dir):
        folder = run_dir if (run_dir / "pseudohealthy.json").is_file() else run_dir / name
        info = json.loads((folder / "pseudohealthy.json").read_text())
        data, training = info.get("data", {}), info.get("training", {})
        files = [str(f) for f in data.get("files", [])]
        if any(TEST_PATIENT in f for f in files):
            raise SystemExit(f"{folder} was trained on the test patient {TEST_PATIENT}: not a valid split")
        found.append(
            {
                "name": name,
                "preset": training.get("preset"),
                "fold": info.get("fold"),
                "steps": training.get("steps_done"),
                "train_seconds": training.get("time_s"),
                "image_size": info.get("image_size"),
                "modality": info.get("modality"),
                "n_train_slices": data.get("n_train_slices"),
                "train_files": files,
            }
        )
    return found


def train(
    args: argparse.Namespace, out: Path, preset: str, folds: str, log: list[dict], *, given: bool
) -> Path:
    """Train ``folds`` into ``out`` unless a given run already holds members (then reuse it)."""
    have = members(out)
    if given and have:
        print(f"      reusing {out} ({', '.join(have)}); not trained again", flush=True)
        return out
    data = [str(args.brats_dir / p) for p in TRAIN_PATIENTS]
    cmd = ["train", *data, "--include", "*Flair*", "--lesion-masks-pattern", LESION, "--modality", "FLAIR"]
    cmd += ["-o", str(out), "--preset", preset, "--folds", folds, "--device", args.device, "--resume"]
    cmd += ["--seed", str(args.seed)]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.tiny:
        cmd += ["--batch-size", "4", "--val-every", "0", "--ckpt-every", "0", "--workers", "0"]
    run(cmd, log)
    return out


def test_slices(args: argparse.Namespace) -> list[int]:
    """The evaluated axial slices of the test patient, chosen exactly as ``evaluate`` does."""
    from pseudohealthy.evaluate import foreground_slices, pick_slices
    from pseudohealthy.io import load_mask, load_scan
    from pseudohealthy.preprocess import foreground_mask

    folder = args.brats_dir / TEST_PATIENT
    volume = load_scan(folder / SCAN)
    brain = load_mask(folder / BRAIN, volume)
    every = foreground_slices(foreground_mask(volume.data, brain))
    return [int(k) for k in pick_slices(every, args.slices_per_volume)]


def restore_and_evaluate(
    args: argparse.Namespace,
    arm: str,
    run_dir: Path,
    slices: list[int],
    out: Path,
    log: list[dict],
    *,
    member: str | None = None,
) -> dict:
    """``restore`` the test patient with one arm, then ``evaluate`` its maps; returns the metrics."""
    folder = args.brats_dir / TEST_PATIENT
    restored = out / "restore" / arm
    cmd = ["restore", str(folder / SCAN), "--ensemble", str(run_dir), "-o", str(restored)]
    cmd += ["--brain-mask", str(folder / BRAIN), "--slices", ",".join(map(str, slices)), "--no-preview"]
    cmd += ["--sampler", args.sampler, "--steps", str(args.eval_steps), "--seed", str(args.seed)]
    cmd += ["--device", args.device, "--overwrite"]
    if member is not None:
        cmd += ["--members", member]
    if arm == "baseline" and args.t_start is not None:
        cmd += ["--t-start", str(args.t_start)]
    run(cmd, log)
    evaluated = out / "eval" / arm
    cmd = ["evaluate", "--scans", str(folder / SCAN), "--masks", str(folder / LESION)]
    cmd += ["--brain-masks", str(folder / BRAIN), "--restorations", str(restored), "-o", str(evaluated)]
    cmd += ["--size", str(args.size), "--overwrite"]
    if args.slices_per_volume:
        cmd += ["--slices-per-volume", str(args.slices_per_volume)]
    run(cmd, log, capture=True)
    return json.loads((evaluated / "metrics.json").read_text())


def _cell(value: float | int | None) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def table(rows: dict[str, dict]) -> str:
    """A markdown table, one row per entry of ``rows`` (metric dicts)."""
    lines = ["| arm | " + " | ".join(c for c, _ in COLUMNS) + " |"]
    lines.append("|---" * (len(COLUMNS) + 1) + "|")
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(k)) for _, k in COLUMNS) + " |")
    return "\n".join(lines)


def figure(args: argparse.Namespace, arms: dict[str, dict], slices: list[int], path: Path) -> Path:
    """Test slices with the most tumour: input, lesion mask, then restoration and map (tumour outlined,
    one colour scale for all arms) per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib
    import numpy as np

    from pseudohealthy.io import scan_name

    def canonical(p: Path) -> np.ndarray:
        return np.asarray(nib.as_closest_canonical(nib.load(p)).get_fdata(dtype=np.float32))

    folder = args.brats_dir / TEST_PATIENT
    image, lesion, brain = (canonical(folder / f) for f in (SCAN, LESION, BRAIN))
    area = {k: int((lesion[:, :, k] > 0).sum()) for k in slices}
    shown = sorted(sorted(slices, key=lambda k: -area[k])[: args.figure_slices])
    name = scan_name(folder / SCAN)
    outputs = {
        arm: (
            canonical(Path(info["restore_dir"]) / f"{name}_pseudohealthy.nii.gz"),
            canonical(Path(info["restore_dir"]) / f"{name}_anomaly.nii.gz"),
        )
        for arm, info in arms.items()
    }
    xs, ys = np.nonzero(brain.any(axis=2))
    crop = (slice(xs.min(), xs.max() + 1), slice(ys.min(), ys.max() + 1))
    inside = image[brain > 0]
    vmin, vmax = np.percentile(inside, [0.5, 99.5]) if inside.size else (image.min(), image.max())

    def view(vol: np.ndarray, k: int) -> np.ndarray:
        return np.rot90(vol[crop[0], crop[1], k])  # RAS: anterior up

    top = max(float(anomaly[:, :, shown].max()) for _, anomaly in outputs.values())  # one map scale
    n_cols = 2 + 2 * len(arms)
    fig, axes = plt.subplots(
        len(shown), n_cols, figsize=(1.9 * n_cols, 2.0 * len(shown) + 0.4), squeeze=False
    )
    for row, k in enumerate(shown):
        panels = [
            ("FLAIR", view(image, k), "gray", (vmin, vmax)),
            ("tumour", view(lesion, k) > 0, "gray", (0, 1)),
        ]
        for arm, (restored, anomaly) in outputs.items():
            panels.append((f"{arm}: restored", view(restored, k), "gray", (vmin, vmax)))
            panels.append((f"{arm}: map", view(anomaly, k), "inferno", (0, max(top, 1e-6))))
        for col, (title, data, cmap, (lo, hi)) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if title.endswith("map") and (view(lesion, k) > 0).any():
                ax.contour(view(lesion, k) > 0, levels=[0.5], colors="cyan", linewidths=0.6)
            if row == 0:
                ax.set_title(title, fontsize=8)
        axes[row, 0].set_ylabel(f"slice {k}", fontsize=8)
    fig.suptitle(f"BraTS 2013 {TEST_PATIENT} (test patient), FLAIR", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/protocol_brats"), help="work folder")
    parser.add_argument(
        "--brats-dir", type=Path, default=SHARED / "lesion/brats2013", help="BraTS 2013 patients"
    )
    parser.add_argument("--ensemble-dir", type=Path, help="reuse this trained ensemble (else OUT/ensemble)")
    parser.add_argument("--baseline-dir", type=Path, help="reuse this trained baseline (else OUT/baseline)")
    parser.add_argument("--folds", default="2,6,9", help="ensemble folds: e.g. 2,6,9 (default) or 'all'")
    parser.add_argument("--steps", type=int, help="training steps per model (default: the preset's)")
    parser.add_argument(
        "--preset", default="cpu", help="model preset (default cpu; baseline: <preset>-baseline)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim", "dpm"))
    parser.add_argument("--eval-steps", type=int, default=50, help="sampling steps at test time (default 50)")
    parser.add_argument("--t-start", type=int, help="baseline's partial-noising depth (default: restore's)")
    parser.add_argument("--slices-per-volume", type=int, help="evaluate N evenly spaced slices (quick runs)")
    parser.add_argument("--size", type=int, default=128, help="evaluation frame size (default 128)")
    parser.add_argument("--figure-slices", type=int, default=3, help="test slices in the figure (default 3)")
    parser.add_argument("--tiny", action="store_true", help="a one-minute smoke run of the whole chain")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset = "tiny"
        args.steps = args.steps or 4
        args.folds = "2,6" if args.folds in ("2,6,9", "all") else args.folds
        args.sampler, args.eval_steps = "ddim", 2
        args.slices_per_volume = args.slices_per_volume or 3
        args.size = 64 if args.size == 128 else args.size
        args.device = "cpu" if args.device == "auto" else args.device
    for p in (*TRAIN_PATIENTS, TEST_PATIENT):
        if not (args.brats_dir / p / SCAN).is_file():
            raise SystemExit(f"BraTS scan not found: {args.brats_dir / p / SCAN}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    t0 = time.perf_counter()
    first_fold = "0" if args.folds == "all" else args.folds.split(",")[0].strip()

    print(f"[1/4] train the conditioned ensemble ({args.preset}, folds {args.folds})", flush=True)
    ens_dir = train(
        args,
        args.ensemble_dir or out / "ensemble",
        args.preset,
        args.folds,
        log,
        given=bool(args.ensemble_dir),
    )
    print(f"[2/4] train the unconditional baseline ({args.preset}-baseline, fold {first_fold})", flush=True)
    base_dir = train(
        args,
        args.baseline_dir or out / "baseline",
        f"{args.preset}-baseline",
        first_fold,
        log,
        given=bool(args.baseline_dir),
    )
    ens_members, base_members = members(ens_dir), members(base_dir)
    if not ens_members or not base_members:
        raise SystemExit(f"no trained members in {ens_dir if not ens_members else base_dir}")

    trained = {"ensemble": describe(ens_dir), "baseline": describe(base_dir)}
    slices = test_slices(args)
    print(f"[3/4] restore + evaluate {TEST_PATIENT} ({len(slices)} slices) with each arm", flush=True)
    plan = {
        "ensemble": (ens_dir, None, f"conditioned ensemble ({len(ens_members)}: {', '.join(ens_members)})"),
        "single": (ens_dir, ens_members[0], f"single conditioned model ({ens_members[0]})"),
        "baseline": (base_dir, None, f"unconditional baseline ({', '.join(base_members)}, partial noising)"),
    }
    arms: dict[str, dict] = {}
    intensity: dict | None = None
    for arm, (run_dir, member, label) in plan.items():
        metrics = restore_and_evaluate(args, arm, run_dir, slices, out, log, member=member)
        arms[arm] = {
            "label": label,
            "run_dir": str(run_dir),
            "members": [member] if member else members(run_dir),
            "training": [
                m
                for m in trained["baseline" if arm == "baseline" else "ensemble"]
                if member is None or m["name"] == member
            ],
            "restore_dir": str(out / "restore" / arm),
            "eval_dir": str(out / "eval" / arm),
            "metrics": {k: metrics.get(k) for _, k in COLUMNS}
            | {"n_lesion_slices": metrics.get("n_lesion_slices")},
        }
        intensity = metrics.get("intensity_baseline")

    print("[4/4] table, results and figure", flush=True)
    rows = {info["label"]: info["metrics"] for info in arms.values()}
    if intensity:
        rows["intensity baseline (Meissen et al.), same slices"] = intensity
    rows |= PAPER_ROWS
    text = table(rows)
    models = "; ".join(
        f"{m['name']} ({kind}): preset {m['preset']}, {m['steps']} steps, {m['image_size']} px"
        for kind, ms in trained.items()
        for m in ms
    )
    notes = (
        f"\nTest: {TEST_PATIENT} (FLAIR), {len(slices)} axial slices, pooled; train: lesion-free slices of "
        f"{', '.join(TRAIN_PATIENTS)}. Models: {models}. Sampler {args.sampler} x {args.eval_steps}, "
        f"seed {args.seed}, evaluation frame {args.size} px.\n"
        "Paper rows: Baugh et al. 2024 Table 1 (ensemble of 10, CamCAN-trained, BraTS 2020): "
        "different data, training and scale; for orientation only.\n"
    )
    (out / "table.md").write_text(text + "\n" + notes)
    fig_path = figure(args, arms, slices, out / "figure.png")
    results = {
        "protocol": "BraTS 2013 FLAIR: train lesion-free slices of pat0003-0005, test all slices of pat0006",
        "split": {"train": list(TRAIN_PATIENTS), "test": [TEST_PATIENT]},
        "tiny": bool(args.tiny),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("tiny",)
        },
        "slices": slices,
        "arms": arms,
        "intensity_baseline": intensity,
        "paper_table1": PAPER_ROWS,
        "figure": str(fig_path),
        "table": str(out / "table.md"),
        "commands": log,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text + "\n" + notes)
    print(f"protocol done in {results['seconds']} s; table -> {out / 'table.md'}, figure -> {fig_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
