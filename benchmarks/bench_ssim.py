"""Which SSIM constants for the default anomaly map: data range 1 against the reference's 255.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ssim.py [--slices 24] [--out DIR]``;
``--tiny`` is a smoke test (tiny random members made on the fly, a synthetic scan, 2 slices).

Restores once with the bundled demo ensemble at the library's default sampler
(:mod:`pseudohealthy.engine.defaults`) and maps every restoration twice, with
``anomaly_map(faithful=False)`` (data range 1) and ``faithful=True`` (data range 255), on sets
that never touch the demo's test patient (0006, the bundled sample scan):

- synthetic: ``--slices`` evenly spaced lesion-free FLAIR slices of the demo's validation
  patient (BraTS 2013 0004), shared round-robin between the members, each member's share
  corrupted with that member's validation tasks (``bench_steps.synthetic_set``), plus the same
  slices uncorrupted as negatives (so slice AUROC and AP_i are defined); scored for the
  ensemble map and for each member's own map on its own share ("held-out member");
- real: ``--slices`` evenly spaced tumour-containing slices of dev patients 0003-0005 (the
  demo trained only on their lesion-free slices).

Metrics are pooled in the model frame (masks resized, > 0.4), beside the intensity baseline on
the same slices. Writes ``ssim.json``, ``ssim.md`` and ``ssim.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_steps import ensemble_folder, synthetic_set

BRATS = Path("/work/shared/data/lesion/brats2013")
VALIDATION_PATIENT = "brats_2013_pat0004_1"
REAL_PATIENTS = ("brats_2013_pat0003_1", "brats_2013_pat0004_1", "brats_2013_pat0005_1")
FLAIR, LESION, BRAIN = "Flair_subtrMeanDivStd.nii.gz", "OTMultiClass.nii.gz", "brainmask.nii.gz"
CONSTANTS = {"unit": False, "faithful": True}  # arm name -> anomaly_map(faithful=...)
METRICS = ("ap_pixel", "best_dice", "auroc", "ap_image")


def _spread(n_items: int, n: int) -> np.ndarray:
    """At most ``n`` evenly spaced (centred) positions of ``range(n_items)``."""
    if n_items <= n:
        return np.arange(n_items)
    return np.unique(((np.arange(n) + 0.5) * n_items / n).astype(int))


def load_patient(folder: Path, ensemble) -> tuple[Any, np.ndarray]:
    """A patient's FLAIR in the ensemble's model frame (brain mask as in training) and its lesion."""
    from pseudohealthy.data.io import load_mask, load_scan
    from pseudohealthy.engine.restore import prepare_for

    volume = load_scan(folder / FLAIR)
    brain = load_mask(folder / BRAIN, volume).astype(bool) if (folder / BRAIN).exists() else None
    lesion = load_mask(folder / LESION, volume) > 0
    return prepare_for(volume, ensemble, brain_mask=brain), lesion


def member_val_tasks(member) -> tuple[int, ...]:
    """One member's validation tasks (recorded, else its fold's; all five when neither is known)."""
    from pseudohealthy.data.anomalies import TASKS, fold_tasks, task_indices

    info = member.describe()
    if info.get("val_tasks"):
        return tuple(task_indices(info["val_tasks"]))
    if isinstance(info.get("fold"), int):
        return tuple(fold_tasks(info["fold"])[1])
    return tuple(range(len(TASKS)))


def synthetic_source(prepared, lesion: np.ndarray, ensemble, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` corrupted lesion-free slices (member ``m`` corrupts rows ``m::M``) and their clean copies."""
    sets = [
        synthetic_set(prepared, lesion, member_val_tasks(member), n, seed + m)
        for m, member in enumerate(ensemble.members)
    ]
    n_members = len(sets)
    rows = sets[0]["rows"]
    owner = np.arange(rows.size) % n_members
    images = np.stack([sets[o]["images"][i] for i, o in enumerate(owner)])
    labels = np.stack([sets[o]["labels"][i] for i, o in enumerate(owner)])
    clean = prepared.images[rows]
    return {
        "images": np.concatenate([images, clean]),
        "labels": np.concatenate([labels, np.zeros_like(labels)]),
        "fg": np.concatenate([prepared.masks[rows]] * 2),
        "owner": np.concatenate([owner, owner]),
    }


def real_source(patients: list[tuple[Any, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    """``n`` evenly spaced tumour-containing model-frame slices pooled over ``patients``."""
    from pseudohealthy.evaluation.pooling import MASK_THRESHOLD, to_frame

    images, labels, fg, keys = [], [], [], []
    for p, (prepared, lesion) in enumerate(patients):
        frame_lesion = to_frame(lesion, prepared.indices, prepared.geometry) > MASK_THRESHOLD
        for j in np.flatnonzero(frame_lesion.any(axis=(1, 2))):
            images.append(prepared.images[j])
            labels.append(frame_lesion[j])
            fg.append(prepared.masks[j])
            keys.append(p * 1000 + int(prepared.indices[j]))
    pick = _spread(len(images), n)
    return {
        "images": np.stack(images)[pick],
        "labels": np.stack(labels)[pick],
        "fg": np.stack(fg)[pick],
        "keys": np.asarray(keys)[pick],
    }


def restore(images: np.ndarray, fg: np.ndarray, keys: np.ndarray, ensemble, settings, device) -> np.ndarray:
    """Every member's restorations ``(M, N, S, S)`` through the engine's public frame API."""
    from pseudohealthy.engine.frame import restore_frame

    plan = settings.plan(ensemble.schedule, conditioned=ensemble.conditioned)
    models = [m.model(device) for m in ensemble.members]
    out, batch = [], 8
    for b in range(0, len(images), batch):
        sl = slice(b, b + batch)
        frame = restore_frame(
            models, ensemble.names, images[sl], fg[sl], [int(k) for k in keys[sl]], plan,
            ensemble.schedule, seed=settings.seed, conditioned=ensemble.conditioned, device=device,
            precision=settings.precision,
        )  # fmt: skip
        out.append(frame.restorations)
    return np.concatenate(out, axis=1)


def member_maps(restorations: np.ndarray, source: dict, faithful: bool) -> np.ndarray:
    """1 - SSIM maps ``(M, N, S, S)`` of every member's restorations with one set of constants."""
    from pseudohealthy.engine.maps import anomaly_map

    return np.stack([anomaly_map(r, source["images"], source["fg"], faithful=faithful) for r in restorations])


def score(maps: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Pooled AP_p, best Dice, and slice AUROC / AP_i (None where every slice has the same label)."""
    from pseudohealthy.engine.maps import slice_scores
    from pseudohealthy.evaluation.metrics import benchmark_metrics

    m = benchmark_metrics(slice_scores(maps), labels.any(axis=(1, 2)), maps, labels, allow_undefined=True)
    return {k: m[k] for k in METRICS}


def baseline(source: dict) -> dict[str, float | None]:
    """The intensity baseline (Meissen et al.) on the same model-frame slices."""
    from pseudohealthy.evaluation.metrics import intensity_baseline_scores

    return score(intensity_baseline_scores(source["images"], source["fg"]), source["labels"])


def evaluate_source(restorations: np.ndarray, source: dict) -> dict[str, dict]:
    """Metrics of both constants (ensemble, and held-out member where owners are known) and the baseline."""
    from pseudohealthy.engine.maps import ensemble_map

    rows: dict[str, dict] = {}
    for name, faithful in CONSTANTS.items():
        per_member = member_maps(restorations, source, faithful)
        rows[f"{name} ensemble"] = score(ensemble_map(per_member, source["fg"]), source["labels"])
        if "owner" in source:
            own = per_member[source["owner"], np.arange(source["owner"].size)]
            rows[f"{name} held-out member"] = score(own, source["labels"])
    rows["intensity baseline"] = baseline(source)
    return rows


def save_arrays(path: Path, sources: dict[str, dict], restorations: dict[str, np.ndarray]) -> Path:
    """``--save-arrays``: each source's model-frame arrays (``s<i>_images``, ``_labels``, ``_fg``,
    ...) and every member's restorations (``s<i>_restorations``), ``sources`` naming them in order."""
    from pseudohealthy.data.files import atomic_write

    arrays = {"sources": np.array(list(sources))}
    for i, (name, source) in enumerate(sources.items()):
        arrays |= {f"s{i}_{key}": np.asarray(value) for key, value in source.items()}
        arrays[f"s{i}_restorations"] = restorations[name]
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table(results: dict[str, dict[str, dict]]) -> str:
    """Markdown table: one row per (source, arm)."""
    lines = ["| source | arm | AP_p | [Dsc] | AUROC | AP_i |", "|---|---|---|---|---|---|"]
    for source, rows in results.items():
        for arm, m in rows.items():
            lines.append(f"| {source} | {arm} | " + " | ".join(_cell(m[k]) for k in METRICS) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, dict]], path: Path) -> None:
    """AP_p and best Dice of each arm, one panel per source."""
    from matplotlib.figure import Figure

    from pseudohealthy.figures import save_figure

    fig = Figure(figsize=(5 * len(results), 4))
    axes = np.atleast_1d(fig.subplots(1, len(results)))
    for ax, (source, rows) in zip(axes, results.items(), strict=True):
        x = np.arange(len(rows))
        for k, (metric, label) in enumerate((("ap_pixel", "AP_p"), ("best_dice", "[Dsc]"))):
            ax.bar(x + (k - 0.5) * 0.38, [r[metric] for r in rows.values()], 0.38, label=label)
        ax.set_xticks(x, list(rows), rotation=30, ha="right", fontsize=7)
        ax.set(ylim=(0, 1), title=source)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def _tiny_inputs(ensemble) -> tuple[tuple[Any, np.ndarray], list[tuple[Any, np.ndarray]]]:
    """A random 'scan' with a square lesion in half of its slices, in the tiny ensemble's frame."""
    from pseudohealthy.engine.restore import prepare_for

    rng = np.random.default_rng(0)
    data = np.zeros((40, 40, 8), dtype=np.float32)
    data[4:36, 4:36] = 0.5 + 0.1 * rng.random((32, 32, 8), dtype=np.float32)
    lesion = np.zeros(data.shape, dtype=bool)
    lesion[15:25, 15:25, 4:] = True
    data[lesion] = 1.0
    prepared = prepare_for(data, ensemble)
    return (prepared, lesion), [(prepared, lesion)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ensemble", help="ensemble folder or bundled name (default: demo)")
    parser.add_argument("--data", type=Path, default=BRATS, help="BraTS 2013 folder of the dev patients")
    parser.add_argument("--slices", type=int, help="slices per source (default 24; 2 with --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="smoke test: tiny random members, synthetic scan")
    parser.add_argument("--out", type=Path, default=Path("out/bench_ssim"), help="output folder")
    parser.add_argument(
        "--save-arrays", action="store_true", help="also write the slices and restorations to OUT/ssim.npz"
    )
    args = parser.parse_args(argv)

    from pseudohealthy.data.files import write_json, write_text
    from pseudohealthy.device import resolve_device
    from pseudohealthy.engine.reference import random_ensemble
    from pseudohealthy.engine.settings import RestoreSettings
    from pseudohealthy.model.checkpoint import Ensemble

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.slices or (2 if args.tiny else 24)
    device = resolve_device(args.device)
    settings = RestoreSettings(seed=args.seed, device=str(device))
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_ensemble(Path(tmp), "tiny", 2) if args.tiny else ensemble_folder(args.ensemble)
        if folder is None:
            parser.error("no --ensemble given and no bundled demo ensemble")
        ensemble = Ensemble.from_dir(folder)
        if args.tiny:
            healthy, patients = _tiny_inputs(ensemble)
        else:
            healthy = load_patient(args.data / VALIDATION_PATIENT, ensemble)
            patients = [load_patient(args.data / p, ensemble) for p in REAL_PATIENTS]
        sources = {
            "synthetic (0004 lesion-free)": synthetic_source(*healthy, ensemble, n, args.seed),
            "real (0003-0005 tumour slices)": real_source(patients, n),
        }
        print(f"{len(ensemble.members)} members, {device}; {settings.sampler} {settings.steps} steps")
        results, seconds, restored = {}, {}, {}
        for name, source in sources.items():
            t0 = time.perf_counter()
            keys = source.get("keys", np.arange(len(source["images"])))
            rest = restore(source["images"], source["fg"], keys, ensemble, settings, device)
            seconds[name] = round(time.perf_counter() - t0, 1)
            results[name] = evaluate_source(rest, source)
            restored[name] = rest
            print(f"{name}: {len(source['images'])} slices restored in {seconds[name]} s", flush=True)
        ensemble.release()

    text = table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "ensemble": str(folder),
        "sampler": settings.sampler,
        "steps": settings.steps,
        "seed": args.seed,
        "slices_per_source": n,
        "n_slices": {k: len(v["images"]) for k, v in sources.items()},
        "restore_seconds": seconds,
        "results": results,
    }
    write_text(args.out / "ssim.md", text)
    write_json(args.out / "ssim.json", summary)
    plot(results, args.out / "ssim.png")
    if args.save_arrays:
        save_arrays(args.out / "ssim.npz", sources, restored)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
