"""Recipe study: detection and healthy-tissue fidelity of trained members against UNet passes.

For each member folder given (one arm of the study: a prediction type, preset, initialisation),
restores synthetic validation anomalies (lesion-free slices of ``--healthy``, corrupted with the
member's own validation tasks, as ``bench_steps.py``) with each sampler setting of
``--configs`` and reports, per arm and setting: pixel AP and best Dice of the 1 - SSIM maps
(library default constants), the restoration's SSIM and PSNR against the clean slice outside the
synthetic anomaly (``training.validation.restoration_fidelity``), UNet passes per slice and the
member's training wall time. Synthetic validation only: no test patient chooses anything.

    .venv/bin/python benchmarks/bench_recipe.py runs/study_epsilon/fold_9 runs/study_v/fold_9 \\
        --healthy SCAN --healthy-lesion MASK --slices 16 --out results/recipe

Writes ``recipe.md``, ``recipe.json`` and ``recipe.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_CONFIGS = "ddpm:50,ddim:10,ddim:5,onepass:1,onepass:5"


def _parse_configs(text: str) -> list[tuple[str, int, str]]:
    """``sampler:steps[:spacing]`` items -> (sampler, steps, spacing); spacing default: the library's."""
    from pseudohealthy.engine.defaults import DEFAULT_SPACING, SPACINGS

    out = []
    for item in text.split(","):
        sampler, steps, *rest = item.strip().split(":")
        spacing = rest[0] if rest else DEFAULT_SPACING
        if spacing not in SPACINGS:
            raise SystemExit(f"unknown spacing {spacing!r} in {item!r}; choose one of {', '.join(SPACINGS)}")
        out.append((sampler, int(steps), spacing))
    return out


def evaluate_arm(
    member_dir: Path, configs: list[tuple[str, int, str]], args: argparse.Namespace
) -> dict[str, Any]:
    """Every sampler setting of one member on its synthetic validation set."""
    from bench_steps import synthetic_set, validation_tasks
    from pseudohealthy.data.io import load_mask, load_scan
    from pseudohealthy.engine.frame import restore_frame
    from pseudohealthy.engine.restore import prepare_for
    from pseudohealthy.engine.settings import RestoreSettings
    from pseudohealthy.evaluation.frame import fidelity_affine, to_fidelity_scale
    from pseudohealthy.evaluation.metrics import benchmark_metrics
    from pseudohealthy.model.checkpoint import Ensemble
    from pseudohealthy.training.validation import restoration_fidelity

    ensemble = Ensemble.from_dir(member_dir)
    clean = load_scan(args.healthy)
    lesion = load_mask(args.healthy_lesion, clean).astype(bool) if args.healthy_lesion else None
    prepared = prepare_for(clean, ensemble)
    lesion = np.zeros(clean.data.shape, dtype=bool) if lesion is None else lesion
    syn = synthetic_set(prepared, lesion, validation_tasks(ensemble), args.slices, args.seed)
    targets = prepared.images[syn["rows"]]
    affine = fidelity_affine(prepared)  # fidelity on the same scale for every normalisation
    models = [m.model("cpu") for m in ensemble.members]
    info = ensemble.members[0].info
    rows = []
    for sampler, steps, spacing in configs:
        settings = RestoreSettings(
            sampler=sampler, steps=steps, spacing=spacing, seed=args.seed, device="cpu"
        )
        plan = settings.plan(ensemble.schedule, conditioned=ensemble.conditioned)
        frame = restore_frame(
            models, ensemble.names, syn["images"], syn["fg"], list(range(len(targets))), plan,
            ensemble.schedule, seed=args.seed, conditioned=ensemble.conditioned, device="cpu",
            precision=args.precision, faithful_ssim=settings.faithful_ssim,
        )  # fmt: skip
        labels = syn["labels"].astype(bool)
        metrics = benchmark_metrics(
            frame.scores, labels.any(axis=(1, 2)), frame.maps, labels, allow_undefined=True
        )
        fidelity = restoration_fidelity(
            to_fidelity_scale(frame.restorations.mean(axis=0), affine),
            to_fidelity_scale(targets, affine),
            syn["fg"],
            syn["labels"],
        )
        rows.append(
            {
                "sampler": sampler,
                "steps": steps,
                "spacing": spacing,
                "unet_passes": plan.n_steps * len(models),
                "ap_pixel": metrics["ap_pixel"],
                "best_dice": metrics["best_dice"],
                **fidelity,
            }
        )
        print(f"{member_dir}: {sampler} {steps}: {rows[-1]}", flush=True)
    return {
        "member": str(member_dir),
        "prediction": ensemble.schedule.prediction,
        "centred": ensemble.schedule.centred,
        "steps_trained": (info.get("training") or {}).get("steps_done"),
        "train_time_s": (info.get("training") or {}).get("time_s"),
        "val_tasks": info.get("val_tasks"),
        "rows": rows,
    }


def _label(row: dict[str, Any]) -> str:
    """The row's sampler, with its spacing when trailing."""
    return row["sampler"] + (" (trailing)" if row.get("spacing") == "trailing" else "")


def table(arms: list[dict[str, Any]]) -> str:
    lines = [
        "| member | prediction | trained steps | training wall s | sampler | steps | UNet passes "
        "| AP_p | [Dsc] "
        "| SSIM healthy | PSNR healthy dB | SSIM anomaly |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for r in arm["rows"]:
            lines.append(
                f"| {arm['member']} | {arm['prediction']} | {arm['steps_trained']} | {arm['train_time_s']} "
                f"| {_label(r)} | {r['steps']} | {r['unet_passes']} | {r['ap_pixel']:.3f} "
                f"| {r['best_dice']:.3f} | {r['val_ssim_out']:.3f} | {r['val_psnr_out']:.1f} "
                f"| {r['val_ssim_in']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def plot(arms: list[dict[str, Any]], path: Path) -> None:
    """AP_p and healthy-tissue SSIM against UNet passes, one line per arm and sampler."""
    from matplotlib.figure import Figure

    from pseudohealthy.figures import save_figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for arm in arms:
        for sampler in dict.fromkeys(r["sampler"] for r in arm["rows"]):
            rows = sorted((r for r in arm["rows"] if r["sampler"] == sampler), key=lambda r: r["unet_passes"])
            label = f"{arm['prediction']} {sampler}"
            x = [r["unet_passes"] for r in rows]
            axes[0].plot(x, [r["ap_pixel"] for r in rows], marker="o", label=label)
            axes[1].plot(x, [r["val_ssim_out"] for r in rows], marker="o", label=label)
    for ax, name in zip(axes, ("synthetic AP_p", "SSIM in healthy tissue"), strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("UNet passes per slice")
        ax.set_ylabel(name)
    axes[0].legend(fontsize=7)
    save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from pseudohealthy.engine.defaults import PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", nargs="+", type=Path, help="member folders (one per arm)")
    parser.add_argument(
        "--healthy", type=Path, required=True, help="scan whose lesion-free slices are corrupted"
    )
    parser.add_argument("--healthy-lesion", type=Path, help="its lesion mask (lesion slices are left out)")
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help="sampler:steps[:spacing],... (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="the UNet's precision (default fp32: arms compare alike on every CPU; auto: the library's rule)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/recipe"))
    args = parser.parse_args(argv)

    from pseudohealthy.data.files import write_json, write_text

    torch.set_num_threads(args.threads)
    configs = _parse_configs(args.configs)
    arms = [evaluate_arm(m, configs, args) for m in args.members]
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(arms)
    print(text)
    write_text(args.out / "recipe.md", text)
    write_json(
        args.out / "recipe.json",
        {"arms": arms, "slices": args.slices, "seed": args.seed, "precision": args.precision},
    )
    plot(arms, args.out / "recipe.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
