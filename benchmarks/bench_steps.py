"""Quality versus sampler steps: AP_p and best Dice of DDIM, DPM-Solver++ and one-pass against 50-step DDPM.

Run: ``.venv/bin/python benchmarks/bench_steps.py [--ensemble DIR] [--slices 8] [--out DIR]``;
``--tiny`` is a smoke test (tiny random members made on the fly, 2 slices, steps 2 and 5).
DDIM and DPM-Solver++ run at every ``--steps-list`` entry, the one-pass sampler (K single
network passes from pure noise, the mean of their x0 estimates) at K in ``--onepass-draws``
(default 1 and 5); ``--spacing trailing`` spaces the DDPM / DDIM timesteps from ``T - 1``.

Two sources, the same for every (sampler, steps):

- synthetic: lesion-free foreground slices of a scan (``--healthy``; default the real scan's
  lesion-free slices, few for the sample scan: its tumour spans most slices) in the model
  frame, each corrupted (always, ``p_none = 0``) with the members' validation tasks (the union
  over members; all five when the members record none), as training validation does; metrics
  pooled over the model-frame pixels against the anomaly masks;
- real: the scan's slices, half with lesion and half without, restored by the engine and
  scored with :func:`pseudohealthy.evaluation.pooling.evaluate_maps` (128 px benchmark frame), beside
  the intensity baseline.

Writes ``steps.png``, ``steps.md`` and ``steps.json`` to ``--out`` and prints the cheapest
(sampler, steps) whose AP_p stays within 0.01 of the reference on both sources.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pseudohealthy.engine.defaults import DEFAULT_SPACING, DEFAULT_STEPS, SAMPLERS, SPACINGS

TOLERANCE = 0.01  # AP_p loss allowed against the reference

REFERENCE_SAMPLER = "ddpm"  # the paper's sampler, at its default steps
ONEPASS = "onepass"  # its steps are noise draws (K), run at ONEPASS_DRAWS rather than the steps list
ONEPASS_DRAWS = (1, 5)  # one draw, and DISYRE's average of 5
CONTESTANTS = tuple(s for s in SAMPLERS if s not in (REFERENCE_SAMPLER, ONEPASS))


def _tiny_ensemble(folder: Path, n_members: int = 2) -> Path:
    """Tiny random members (folds 0.. with their validation tasks) in ``folder``."""
    from pseudohealthy.engine.reference import random_ensemble

    return random_ensemble(folder, "tiny", n_members)


def validation_tasks(ensemble) -> tuple[int, ...]:
    """The union of the members' validation tasks (all five when none is recorded)."""
    from pseudohealthy.data.anomalies import TASKS, fold_tasks, task_indices

    tasks: set[int] = set()
    for member in ensemble.members:
        info = member.describe()
        if info.get("val_tasks"):
            tasks.update(task_indices(info["val_tasks"]))
        elif isinstance(info.get("fold"), int):
            tasks.update(fold_tasks(info["fold"])[1])
    return tuple(sorted(tasks)) or tuple(range(len(TASKS)))


def _spread(values: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` evenly spaced entries of ``values`` (centred: ``n = 1`` gives the middle one)."""
    if values.size <= n:
        return values
    return values[np.unique(((np.arange(n) + 0.5) * values.size / n).astype(int))]


def synthetic_set(prepared, lesion: np.ndarray, tasks: tuple[int, ...], n: int, seed: int = 0) -> dict:
    """``n`` lesion-free model-frame slices corrupted with ``tasks``: images, masks, foregrounds."""
    from pseudohealthy.data.anomalies import Corruptor, keyed_rng

    free = np.array([j for j, k in enumerate(prepared.indices) if not lesion[:, :, k].any()])
    if free.size == 0:
        raise SystemExit("the scan has no lesion-free foreground slice for the synthetic set")
    picked = _spread(free, n)
    corruptor = Corruptor(tasks, p_none=0.0, size=prepared.geometry.size)
    images, masks = [], []
    for j in picked:
        pool = [prepared.images[i] for i in free if i != j] or [prepared.images[j]]
        img, mask, _ = corruptor(
            prepared.images[j], prepared.masks[j], keyed_rng(seed, 1, int(j)), intra_sources=pool
        )
        images.append(img)
        masks.append(mask)
    return {
        "images": np.stack(images),
        "labels": np.stack(masks),
        "fg": prepared.masks[picked],
        "rows": picked,
    }


def restore_frames(
    images: np.ndarray, fg: np.ndarray, ensemble, settings, device: torch.device
) -> np.ndarray:
    """Ensemble 1 - SSIM maps of model-frame images ``(N, S, S)`` with the engine's public frame API."""
    from pseudohealthy.engine.frame import restore_frame

    plan = settings.plan(ensemble.schedule, conditioned=ensemble.conditioned)
    models = [m.model(device) for m in ensemble.members]
    out, batch = [], 8
    for b in range(0, len(images), batch):
        rows = list(range(b, min(b + batch, len(images))))
        frame = restore_frame(
            models, ensemble.names, images[rows], fg[rows], rows, plan, ensemble.schedule,
            seed=settings.seed, conditioned=ensemble.conditioned, device=device,
            precision=settings.precision, faithful_ssim=settings.faithful_ssim,
        )  # fmt: skip
        out.append(frame.maps)
    return np.concatenate(out)


def _pixel_metrics(maps: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from pseudohealthy.engine.maps import slice_scores
    from pseudohealthy.evaluation.metrics import benchmark_metrics

    m = benchmark_metrics(slice_scores(maps), labels.any(axis=(1, 2)), maps, labels, allow_undefined=True)
    return {"ap_pixel": m["ap_pixel"], "best_dice": m["best_dice"]}


def evaluate_config(sampler: str, steps: int, ctx: dict[str, Any]) -> dict[str, Any]:
    """Metrics of one (sampler, steps) on both sources, with seconds and UNet passes per slice."""
    from pseudohealthy.engine.restore import restore_volume
    from pseudohealthy.engine.settings import RestoreSettings
    from pseudohealthy.evaluation.pooling import EvalEntry, evaluate_maps

    settings = RestoreSettings(
        sampler=sampler, steps=steps, seed=ctx["seed"], device=str(ctx["device"]), spacing=ctx["spacing"]
    )
    t0 = time.perf_counter()
    syn = ctx["synthetic"]
    syn_maps = restore_frames(syn["images"], syn["fg"], ctx["ensemble"], settings, ctx["device"])
    result = restore_volume(ctx["volume"], ctx["ensemble"], settings, slices=ctx["real_slices"])
    seconds = time.perf_counter() - t0
    entry = EvalEntry(
        "real",
        result.anomaly,
        ctx["lesion"],
        ctx["prepared"].foreground,
        ctx["volume"].data,
        ctx["real_slices"],
    )
    real = evaluate_maps([entry])
    if ctx.get("maps_dir") is not None:
        save_maps(ctx["maps_dir"] / f"{sampler}_{steps}.npz", syn_maps, result.anomaly, ctx)
    n_slices = len(syn["images"]) + len(ctx["real_slices"])
    return {
        "sampler": sampler,
        "steps": steps,
        "unet_passes_per_slice": result.settings["n_steps"] * len(ctx["ensemble"].members),
        "s_per_slice": seconds / n_slices,
        "synthetic": _pixel_metrics(syn_maps, syn["labels"]),
        "real": {"ap_pixel": real["ap_pixel"], "best_dice": real["best_dice"]},
        "real_intensity_baseline": {k: real["intensity_baseline"][k] for k in ("ap_pixel", "best_dice")},
    }


def save_maps(path: Path, syn_maps: np.ndarray, anomaly: np.ndarray, ctx: dict[str, Any]) -> Path:
    """``--save-maps``: one row's synthetic maps and anomaly masks (model frame) and its real map
    and foreground at the real slices (the scan's grid, ``(X, Y, n)``)."""
    from pseudohealthy.data.files import atomic_write

    k = ctx["real_slices"]
    arrays = {"synthetic_maps": syn_maps, "synthetic_labels": ctx["synthetic"]["labels"]}
    arrays |= {"real_maps": anomaly[:, :, k], "real_fg": ctx["prepared"].foreground[:, :, k]}
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def cheapest(rows: list[dict[str, Any]], reference: dict[str, Any]) -> dict[str, Any] | None:
    """The row with the fewest UNet passes (then seconds) within TOLERANCE AP_p of the reference on the
    synthetic validation anomalies (the real slices are reported, never used to choose)."""
    ok = [r for r in rows if r["synthetic"]["ap_pixel"] >= reference["synthetic"]["ap_pixel"] - TOLERANCE]
    return min(ok, key=lambda r: (r["unet_passes_per_slice"], r["s_per_slice"])) if ok else None


def table(rows: list[dict[str, Any]], reference: dict[str, Any]) -> str:
    """Markdown table: reference row first, then every (sampler, steps)."""
    lines = [
        "| sampler | steps | UNet passes/slice | s/slice | synthetic AP_p | synthetic best Dice "
        "| real AP_p | real best Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in [reference, *rows]:
        name = f"{r['sampler']} (reference)" if r is reference else r["sampler"]
        lines.append(
            f"| {name} | {r['steps']} | {r['unet_passes_per_slice']} | {r['s_per_slice']:.3f} "
            f"| {r['synthetic']['ap_pixel']:.4f} | {r['synthetic']['best_dice']:.4f} "
            f"| {r['real']['ap_pixel']:.4f} | {r['real']['best_dice']:.4f} |"
        )
    base = reference["real_intensity_baseline"]
    lines.append(
        f"\nIntensity baseline on the real slices: AP_p {base['ap_pixel']:.4f}, "
        f"best Dice {base['best_dice']:.4f}."
    )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], reference: dict[str, Any], path: Path) -> None:
    """AP_p and best Dice against steps, one panel per source; the reference as a dashed line."""
    from matplotlib.figure import Figure

    from pseudohealthy.figures import save_figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, source in zip(axes, ("synthetic", "real"), strict=True):
        for sampler, marker in zip((*CONTESTANTS, ONEPASS), "os^v", strict=False):
            rs = [r for r in rows if r["sampler"] == sampler]
            if not rs:
                continue  # not run: no empty entry in the legend
            steps = [r["steps"] for r in rs]
            for metric, style in (("ap_pixel", "-"), ("best_dice", ":")):
                ax.plot(
                    steps, [r[source][metric] for r in rs], style, marker=marker, label=f"{sampler} {metric}"
                )
        for metric, color in (("ap_pixel", "k"), ("best_dice", "grey")):
            ax.axhline(
                reference[source][metric], ls="--", color=color, label=f"ddpm {reference['steps']} {metric}"
            )
        ax.set(xscale="log", xlabel="sampler steps", ylabel="score", title=source)
        ax.minorticks_off()
        ax.set_xticks(
            sorted({r["steps"] for r in rows}), [str(v) for v in sorted({r["steps"] for r in rows})]
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def ensemble_folder(given: str | None) -> Path | None:
    """``--ensemble`` as the command line takes it (a folder or a bundled name), else the demo's."""
    from pseudohealthy.data.sample import demo_ensemble_path, resolve_ensemble

    return resolve_ensemble(given) if given else demo_ensemble_path()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ensemble", help="ensemble folder or bundled name (default: demo)")
    parser.add_argument("--scan", type=Path, help="real scan (default: the bundled sample scan)")
    parser.add_argument("--lesion", type=Path, help="its lesion mask (default: the sample scan's)")
    parser.add_argument(
        "--healthy",
        type=Path,
        help="healthy scan for the synthetic set (default: the real scan's lesion-free slices)",
    )
    parser.add_argument(
        "--healthy-lesion", type=Path, help="lesion mask of --healthy: its lesion slices are left out"
    )
    parser.add_argument(
        "--samplers",
        default=",".join(CONTESTANTS),
        help="comma-separated samplers to compare with the reference (default %(default)s)",
    )
    parser.add_argument("--slices", type=int, help="slices per source (default 8; 2 with --tiny)")
    parser.add_argument("--steps-list", help="comma-separated steps (default 5,10,20,50; 2,5 with --tiny)")
    parser.add_argument("--ref-steps", type=int, help="DDPM reference steps (default 50; 5 with --tiny)")
    parser.add_argument(
        "--onepass-draws",
        default=",".join(map(str, ONEPASS_DRAWS)),
        help="comma-separated K of the one-pass sampler (default %(default)s; empty: none)",
    )
    parser.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SPACING, help="ddpm/ddim timesteps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)"
    )
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny random members made on the fly")
    parser.add_argument("--out", type=Path, default=Path("out/bench_steps"), help="output folder")
    parser.add_argument(
        "--save-maps", action="store_true", help="also write each row's maps: OUT/maps/<sampler>_<steps>.npz"
    )
    args = parser.parse_args(argv)

    from pseudohealthy.data.io import load_mask, load_scan
    from pseudohealthy.data.sample import sample_mask_path, sample_scan_path
    from pseudohealthy.device import resolve_device
    from pseudohealthy.engine.restore import prepare_for
    from pseudohealthy.model.checkpoint import Ensemble

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.slices or (2 if args.tiny else 8)
    steps_list = [int(s) for s in (args.steps_list or ("2,5" if args.tiny else "5,10,20,50")).split(",")]
    ref_steps = args.ref_steps or (5 if args.tiny else DEFAULT_STEPS[REFERENCE_SAMPLER])
    onepass_draws = [int(k) for k in args.onepass_draws.split(",") if k.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        folder = _tiny_ensemble(Path(tmp)) if args.tiny else ensemble_folder(args.ensemble)
        if folder is None:
            parser.error("no --ensemble given and no bundled demo ensemble")
        ensemble = Ensemble.from_dir(folder)
        device = resolve_device(args.device)
        volume = load_scan(args.scan or sample_scan_path())
        lesion = load_mask(args.lesion or sample_mask_path(), volume).astype(bool)
        prepared = prepare_for(volume, ensemble)
        with_lesion = np.array([k for k in prepared.indices if lesion[:, :, k].any()])
        without = np.array([k for k in prepared.indices if not lesion[:, :, k].any()])
        real_slices = np.sort(np.concatenate([_spread(with_lesion, (n + 1) // 2), _spread(without, n // 2)]))
        tasks = validation_tasks(ensemble)
        healthy = (prepared, lesion)
        if args.healthy:
            clean = load_scan(args.healthy)
            clean_lesion = (
                load_mask(args.healthy_lesion, clean).astype(bool)
                if args.healthy_lesion
                else np.zeros(clean.data.shape, dtype=bool)
            )
            healthy = (prepare_for(clean, ensemble), clean_lesion)
        ctx = {
            "ensemble": ensemble,
            "device": device,
            "seed": args.seed,
            "spacing": args.spacing,
            "volume": volume,
            "lesion": lesion,
            "prepared": prepared,
            "real_slices": real_slices.astype(int),
            "synthetic": synthetic_set(*healthy, tasks, n, args.seed),
            "maps_dir": args.out / "maps" if args.save_maps else None,
        }
        print(f"{len(ensemble.members)} members from {folder}, {device}; validation tasks {tasks}")
        reference = evaluate_config(REFERENCE_SAMPLER, ref_steps, ctx)
        rows = []
        samplers = [name for name in args.samplers.split(",") if name.strip()]
        unknown = sorted(set(samplers) - set(CONTESTANTS))
        if unknown:
            parser.error(f"unknown sampler(s) {', '.join(unknown)}; choose from {', '.join(CONTESTANTS)}")
        runs = [(s, k) for s in samplers for k in steps_list] + [(ONEPASS, k) for k in onepass_draws]
        for sampler, steps in runs:
            rows.append(evaluate_config(sampler, steps, ctx))
            syn, real = rows[-1]["synthetic"]["ap_pixel"], rows[-1]["real"]["ap_pixel"]
            print(f"{sampler} {steps}: AP_p synthetic {syn:.4f}, real {real:.4f}")
        ensemble.release()

    best = cheapest(rows, reference)
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(rows, reference)
    verdict = f"cheapest within {TOLERANCE} AP_p of {ref_steps}-step DDPM on the synthetic anomalies: " + (
        f"{best['sampler']} {best['steps']} steps" if best else "none"
    )
    (args.out / "steps.md").write_text(text + "\n" + verdict + "\n")
    summary = {
        "ensemble": str(folder),
        "validation_tasks": list(tasks),
        "slices_per_source": n,
        "real_slices": ctx["real_slices"].tolist(),
        "reference": reference,
        "rows": rows,
        "tolerance": TOLERANCE,
        "spacing": args.spacing,
        "cheapest": None if best is None else {"sampler": best["sampler"], "steps": best["steps"]},
    }
    (args.out / "steps.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(rows, reference, args.out / "steps.png")
    print(text)
    print(verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
