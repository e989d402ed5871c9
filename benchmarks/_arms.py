"""The three-arm comparison shared by the real-data protocols.

Arms, all in the same harness, on the same test slices, with the same sampler and seed:
``ensemble`` (the image-conditioned ensemble), ``single`` (its first member alone) and
``baseline`` (the unconditional reconstruction baseline, restored by partial noising). Each arm is
``pseudohealthy restore`` per test scan, then one ``pseudohealthy evaluate --restorations`` over
all test scans (pooled metrics with the intensity baseline beside them). Writes ``OUT/table.md``,
``OUT/results.json`` and ``OUT/figure.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from _steps import run

ARMS = ("ensemble", "single", "baseline")
COLUMNS = (("AP_i", "ap_image"), ("AUROC", "auroc"), ("AP_p", "ap_pixel"), ("[Dsc]", "best_dice"))
COLUMNS += (("Dice@5%FPR", "dice_at_5fpr"), ("n slices", "n_slices"))


@dataclass(frozen=True)
class TestScan:
    """One test volume: its scan, lesion mask and (optional) brain mask. ``label`` (the scan's
    folder name) names its restore sub-folder, where ``evaluate --restorations`` finds it."""

    scan: Path
    lesion: Path
    brain: Path | None = None

    @property
    def label(self) -> str:
        return self.scan.parent.name


def add_arm_arguments(parser: argparse.ArgumentParser, *, folds: str) -> None:
    """The options every three-arm protocol has (training, sampling, evaluation, figure)."""
    from pseudohealthy.engine.defaults import BASELINE_T_START, DEFAULT_SAMPLER, SAMPLERS

    parser.add_argument("--ensemble-dir", type=Path, help="reuse this trained ensemble (else OUT/ensemble)")
    parser.add_argument("--baseline-dir", type=Path, help="reuse this trained baseline (else OUT/baseline)")
    parser.add_argument("--folds", default=folds, help=f"ensemble folds: e.g. {folds} (default) or 'all'")
    parser.add_argument("--steps", type=int, help="training steps per model (default: the preset's)")
    parser.add_argument(
        "--preset", default="cpu", help="model preset (default cpu; baseline: <preset>-baseline)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default auto)")
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    parser.add_argument(
        "--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS, help=f"default {DEFAULT_SAMPLER}"
    )
    parser.add_argument(
        "--eval-steps", type=int, help="sampling steps at test time (default: the sampler's default steps)"
    )
    parser.add_argument(
        "--t-start", type=int, help=f"baseline's partial-noising depth (default {BASELINE_T_START})"
    )
    parser.add_argument("--slices-per-volume", type=int, help="evaluate N evenly spaced slices (quick runs)")
    parser.add_argument("--size", type=int, default=128, help="evaluation frame size (default 128)")
    parser.add_argument("--figure-slices", type=int, default=3, help="test slices in the figure (default 3)")
    parser.add_argument("--tiny", action="store_true", help="a one-minute smoke run of the whole chain")


def tiny_settings(args: argparse.Namespace, *, folds: str) -> None:
    """``--tiny``: tiny preset, ``folds``, a few training steps, 2 DDIM steps, 3 slices, 64 px."""
    args.preset = "tiny"
    args.steps = args.steps or 4
    args.folds = folds
    args.sampler, args.eval_steps = "ddim", 2
    args.slices_per_volume = args.slices_per_volume or 3
    args.size = 64 if args.size == 128 else args.size
    args.device = "cpu" if args.device == "auto" else args.device


def members(run_dir: Path) -> list[str]:
    """Names of the trained members in ``run_dir`` (sorted, as ``restore`` loads them)."""
    if (run_dir / "pseudohealthy.json").is_file():
        return [run_dir.name]
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if (p / "pseudohealthy.json").is_file())


def describe(run_dir: Path, test_ids: Sequence[str]) -> list[dict]:
    """How each member of ``run_dir`` was trained; exits if one saw a test volume (leakage)."""
    found = []
    for name in members(run_dir):
        folder = run_dir if (run_dir / "pseudohealthy.json").is_file() else run_dir / name
        info = json.loads((folder / "pseudohealthy.json").read_text())
        data, training = info.get("data", {}), info.get("training", {})
        files = [str(f) for f in data.get("files", [])]
        leaked = [t for t in test_ids if any(t in f for f in files)]
        if leaked:
            raise SystemExit(f"{folder} was trained on the test patient {leaked[0]}: not a valid split")
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
    args: argparse.Namespace,
    out: Path,
    preset: str,
    folds: str,
    data: Sequence[str],
    log: list[dict],
    *,
    given: bool,
) -> Path:
    """``pseudohealthy train DATA`` for ``folds`` into ``out`` (``--resume``: finished folds are kept),
    unless ``out`` was given and already holds members: then it is reused as it is."""
    have = members(out)
    if given and have:
        print(f"      reusing {out} ({', '.join(have)}); not trained again", flush=True)
        return out
    cmd = ["train", *data, "-o", str(out), "--preset", preset, "--folds", folds]
    cmd += ["--device", args.device, "--resume", "--seed", str(args.seed)]
    if args.steps is not None:
        cmd += ["--steps", str(args.steps)]
    if args.tiny:
        cmd += ["--batch-size", "4", "--val-every", "0", "--ckpt-every", "0", "--workers", "0"]
    run(cmd, log)
    return out


@cache
def _load(test: TestScan) -> tuple:
    """``(volume, lesion mask, brain mask or None)`` of ``test``, canonical, read once per process."""
    from pseudohealthy.data.io import load_mask, load_scan

    volume = load_scan(test.scan)
    brain = load_mask(test.brain, volume) if test.brain is not None else None
    return volume, load_mask(test.lesion, volume), brain


def _brain(test: TestScan) -> np.ndarray:
    """The brain mask of ``test``, or its voxels above the scan's minimum when it has none."""
    volume, _, brain = _load(test)
    return brain if brain is not None else volume.data > volume.data.min()


@cache
def _outputs(restore_dir: Path, test: TestScan) -> tuple[np.ndarray, np.ndarray]:
    """``(restoration, anomaly map)`` an arm wrote for ``test`` under ``restore_dir``, canonical;
    read once per process (for the lesion contrast and the figure)."""
    from pseudohealthy.data.io import load_map, scan_name
    from pseudohealthy.engine.outputs import ANOMALY_SUFFIX, PSEUDO_SUFFIX

    volume = _load(test)[0]
    stem = restore_dir / test.label / scan_name(test.scan)
    return tuple(load_map(f"{stem}{suffix}", volume) for suffix in (PSEUDO_SUFFIX, ANOMALY_SUFFIX))


def test_slices(test: TestScan, n: int | None) -> list[int]:
    """The evaluated axial slices of ``test``, chosen exactly as ``evaluate`` does."""
    from pseudohealthy.data.preprocess import foreground_mask
    from pseudohealthy.evaluation.cases import evenly_spaced
    from pseudohealthy.evaluation.pooling import foreground_slices

    volume, _, brain = _load(test)
    every = foreground_slices(foreground_mask(volume.data, brain))
    return [int(k) for k in evenly_spaced(every, n)]


def restore_and_evaluate(
    args: argparse.Namespace,
    arm: str,
    run_dir: Path,
    tests: Sequence[TestScan],
    slices: dict[str, list[int]],
    out: Path,
    log: list[dict],
    *,
    member: str | None = None,
    evaluate_options: Sequence[str] = (),
) -> dict:
    """``restore`` every test scan with one arm, then ``evaluate`` the maps; returns the metrics."""
    restored = out / "restore" / arm
    for test in tests:
        cmd = ["restore", str(test.scan), "--ensemble", str(run_dir), "-o", str(restored / test.label)]
        if test.brain is not None:
            cmd += ["--brain-mask", str(test.brain)]
        cmd += ["--slices", ",".join(map(str, slices[test.label])), "--no-preview"]
        cmd += ["--sampler", args.sampler, "--steps", str(args.eval_steps), "--seed", str(args.seed)]
        cmd += ["--device", args.device, "--overwrite"]
        if member is not None:
            cmd += ["--members", member]
        if arm == "baseline" and args.t_start is not None:
            cmd += ["--t-start", str(args.t_start)]
        run(cmd, log)
    evaluated = out / "eval" / arm
    cmd = ["evaluate", "--scans", *(str(t.scan) for t in tests), "--masks", *(str(t.lesion) for t in tests)]
    if all(t.brain is not None for t in tests):
        cmd += ["--brain-masks", *(str(t.brain) for t in tests)]
    cmd += ["--restorations", str(restored), "-o", str(evaluated), "--size", str(args.size), "--overwrite"]
    cmd += ["--frame", "native"]  # restore's maps are in the scans' grid
    cmd += list(evaluate_options)
    if args.slices_per_volume:
        cmd += ["--slices-per-volume", str(args.slices_per_volume)]
    run(cmd, log, capture=True)
    return json.loads((evaluated / "metrics.json").read_text())


def lesion_contrast(tests: Sequence[TestScan], restore_dir: Path) -> dict[str, float]:
    """Where one arm's maps and restorations differ inside lesions, over all test scans (voxels of
    the restored slices, in the scans' own grid): the mean map inside lesions and in the rest of
    the brain, their ratio, and the mean change ``restored - input`` inside lesions and the mean
    ``|restored - input|`` elsewhere, both as fractions of the brain's 99th intensity percentile.
    A restoration that copies its input leaves the lesion change near 0."""
    sums = dict.fromkeys(("map_les", "map_rest", "change_les", "abs_change_rest"), 0.0)
    n_les = n_rest = 0
    for test in tests:
        (volume, lesion, _), brain = _load(test), _brain(test)
        image = volume.data
        restoration, amap = _outputs(restore_dir, test)
        change = (restoration - image) / np.percentile(image[brain], 99)
        restored = np.zeros_like(brain)
        restored[:, :, amap.reshape(-1, amap.shape[2]).any(axis=0)] = True  # slices with a map
        les, rest = lesion & brain & restored, ~lesion & brain & restored
        sums["map_les"] += float(amap[les].sum())
        sums["map_rest"] += float(amap[rest].sum())
        sums["change_les"] += float(change[les].sum())
        sums["abs_change_rest"] += float(np.abs(change[rest]).sum())
        n_les, n_rest = n_les + int(les.sum()), n_rest + int(rest.sum())
    out = {
        "map_in_lesion": sums["map_les"] / max(n_les, 1),
        "map_in_other_brain": sums["map_rest"] / max(n_rest, 1),
        "change_in_lesion": sums["change_les"] / max(n_les, 1),
        "abs_change_in_other_brain": sums["abs_change_rest"] / max(n_rest, 1),
    }
    out["map_ratio"] = out["map_in_lesion"] / max(out["map_in_other_brain"], 1e-12)
    return out


CONTRAST_COLUMNS = (
    ("map in lesion", "map_in_lesion"),
    ("map elsewhere", "map_in_other_brain"),
    ("ratio", "map_ratio"),
    ("restored - input in lesion", "change_in_lesion"),
    ("abs(restored - input) elsewhere", "abs_change_in_other_brain"),
)


def _cell(value: float | int | None) -> str:
    """Three decimals; values under 0.001 in three significant digits (maps with the reference's
    SSIM constants are about 1e-5 in healthy tissue, which three decimals would show as 0.000)."""
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.2e}"


def table(rows: dict[str, dict], columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """A markdown table, one row per entry of ``rows`` (metric dicts), one column per ``columns``."""
    lines = ["| arm | " + " | ".join(c for c, _ in columns) + " |"]
    lines.append("|---" * (len(columns) + 1) + "|")
    for name, metrics in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


def figure(
    args: argparse.Namespace,
    tests: Sequence[TestScan],
    arms: dict[str, dict],
    slices: dict[str, list[int]],
    path: Path,
    *,
    title: str,
    modality: str,
) -> Path:
    """The test slices with the most lesion (over all test scans): input, lesion mask, then
    restoration and map per arm (lesion outlined; each arm's maps on their own scale, 0 .. the
    :func:`~pseudohealthy.figures.ranges.display_range` of its shown slices, written in the column
    title: arms' maps differ by orders of magnitude, and one shared scale hid the smaller ones)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pseudohealthy.data.files import atomic_write
    from pseudohealthy.figures.orientation import axial_display
    from pseudohealthy.figures.preview import draw_edge_labels
    from pseudohealthy.figures.ranges import display_range

    volumes = {test.label: (_load(test)[0].data, _load(test)[1], _brain(test)) for test in tests}
    area = [(int(volumes[t][1][:, :, k].sum()), t, k) for t in slices for k in slices[t]]
    shown = sorted((t, k) for _, t, k in sorted(area, reverse=True)[: args.figure_slices])
    outputs = {
        (arm, test.label): _outputs(Path(info["restore_dir"]), test)
        for arm, info in arms.items()
        for test in tests
    }
    tops = {
        arm: display_range(np.stack([outputs[(arm, t)][1][:, :, k] for t, k in shown]))[1] for arm in arms
    }
    n_cols = 2 + 2 * len(arms)
    fig, axes = plt.subplots(
        len(shown), n_cols, figsize=(1.9 * n_cols, 2.0 * len(shown) + 0.4), squeeze=False
    )
    for row, (label, k) in enumerate(shown):
        image, lesion, brain = volumes[label]
        xs, ys = np.nonzero(brain.any(axis=2))
        inside = image[brain]
        vmin, vmax = np.percentile(inside, [0.5, 99.5]) if inside.size else (image.min(), image.max())

        def view(vol: np.ndarray, k: int = k, xs: np.ndarray = xs, ys: np.ndarray = ys) -> np.ndarray:
            return axial_display(vol[xs.min() : xs.max() + 1, ys.min() : ys.max() + 1, k])  # radiological

        panels = [(modality, view(image), "gray", (vmin, vmax)), ("lesion", view(lesion), "gray", (0, 1))]
        for arm in arms:
            restored, anomaly = outputs[(arm, label)]
            panels.append((f"{arm}: restored", view(restored), "gray", (vmin, vmax)))
            panels.append((f"{arm}: map (0-{tops[arm]:.2g})", view(anomaly), "inferno", (0, tops[arm])))
        for col, (name, data, cmap, (lo, hi)) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(data, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            draw_edge_labels(ax, fontsize=6)
            if ": map" in name and view(lesion).any():
                ax.contour(view(lesion), levels=[0.5], colors="cyan", linewidths=0.6)
            if row == 0:
                ax.set_title(name, fontsize=8)
        axes[row, 0].set_ylabel(f"{label} {k}" if len(tests) > 1 else f"slice {k}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def compare(
    args: argparse.Namespace,
    *,
    tests: Sequence[TestScan],
    ens_dir: Path,
    base_dir: Path,
    out: Path,
    log: list[dict],
    protocol: dict,
    paper_rows: dict[str, dict],
    modality: str,
    evaluate_options: Sequence[str] = (),
    started: float | None = None,
) -> dict:
    """Restore and evaluate ``tests`` with the three arms; write the table, results and figure.

    ``protocol`` holds ``name`` (one line), ``split`` ({"train": [...], "test": [...]}) and ``test``
    and ``train`` (phrases for the table's notes); ``started`` (``perf_counter()``) is when the
    protocol began. Returns the results (also ``OUT/results.json``).
    """
    from pseudohealthy.data.files import write_json, write_text
    from pseudohealthy.engine.defaults import default_steps

    t0 = time.perf_counter() if started is None else started
    if args.eval_steps is None:
        args.eval_steps = default_steps(args.sampler)
    ens_members, base_members = members(ens_dir), members(base_dir)
    if not ens_members or not base_members:
        raise SystemExit(f"no trained members in {ens_dir if not ens_members else base_dir}")
    test_ids = protocol["split"]["test"]
    trained = {"ensemble": describe(ens_dir, test_ids), "baseline": describe(base_dir, test_ids)}
    slices = {t.label: test_slices(t, args.slices_per_volume) for t in tests}
    n_slices = sum(map(len, slices.values()))
    print(f"[3/4] restore + evaluate {', '.join(slices)} ({n_slices} slices) with each arm", flush=True)
    plan = {
        "ensemble": (ens_dir, None, f"conditioned ensemble ({len(ens_members)}: {', '.join(ens_members)})"),
        "single": (ens_dir, ens_members[0], f"single conditioned model ({ens_members[0]})"),
        "baseline": (base_dir, None, f"unconditional baseline ({', '.join(base_members)}, partial noising)"),
    }
    arms: dict[str, dict] = {}
    intensity: dict | None = None
    for arm, (run_dir, member, label) in plan.items():
        metrics = restore_and_evaluate(
            args, arm, run_dir, tests, slices, out, log, member=member, evaluate_options=evaluate_options
        )
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
            "lesion_contrast": lesion_contrast(tests, out / "restore" / arm),
        }
        intensity = metrics.get("intensity_baseline")

    print("[4/4] table, results and figure", flush=True)
    rows = {info["label"]: info["metrics"] for info in arms.values()}
    if intensity:
        rows["intensity baseline (Meissen et al.), same slices"] = intensity
    rows |= paper_rows
    text = table(rows)
    models = "; ".join(
        f"{m['name']} ({kind}): preset {m['preset']}, {m['steps']} steps, {m['image_size']} px"
        for kind, ms in trained.items()
        for m in ms
    )
    notes = (
        f"\nTest: {protocol['test']}, {n_slices} axial slices, pooled; train: {protocol['train']}. "
        f"Models: {models}. Sampler {args.sampler} x {args.eval_steps}, seed {args.seed}, "
        f"evaluation frame {args.size} px.\n"
        "Paper rows: Baugh et al. 2024 Table 1 (ensemble of 10, CamCAN-trained, BraTS 2020 / ATLAS): "
        "different data, training and scale; for orientation only.\n"
    )
    contrast = table({info["label"]: info["lesion_contrast"] for info in arms.values()}, CONTRAST_COLUMNS)
    notes += (
        "\nWhere the arms differ inside lesions (restored slices; changes as fractions of the brain's "
        "99th intensity percentile):\n\n" + contrast + "\n"
    )
    write_text(out / "table.md", text + "\n" + notes)
    fig_path = figure(
        args, tests, arms, slices, out / "figure.png", title=protocol["name"], modality=modality
    )
    results = {
        "protocol": protocol["name"],
        "split": protocol["split"],
        "tiny": bool(args.tiny),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("tiny",)
        },
        "slices": slices,
        "arms": arms,
        "intensity_baseline": intensity,
        "paper_table1": paper_rows,
        "figure": str(fig_path),
        "table": str(out / "table.md"),
        "commands": log,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "results.json", results)
    print(text + "\n" + notes)
    return results
