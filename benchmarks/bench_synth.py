"""Speed of the five synthetic anomaly tasks on real 128x128 brain slices, one CPU core.

Run: ``.venv/bin/python benchmarks/bench_synth.py [--quick] [--check]``. Prints corrupted
slices per second per core (CPU time of this single-threaded process, and wall time) for
each task, their mean, the training Corruptor, and the ratio to the 100 slices/s target.
``--compare-styles`` instead measures the reference and legacy task styles side by side
(largest displacement, shape sides, border cuts, overlap, intensity amplitude, time per sample).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

TARGET = 100.0  # corrupted slices per second per core
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCANS = (
    "lesion/brats2013/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz",
    "lesion/mslub/patient07/T2.nii.gz",
    "lesion/mslub/patient19/T1.nii.gz",
)


def load_slices(paths: list[Path], size: int) -> list:
    """Prepared scans (model-frame slices) of the benchmark volumes."""
    from pseudohealthy.data.io import load_scan
    from pseudohealthy.data.preprocess import prepare_scan

    return [prepare_scan(load_scan(p), size=size) for p in paths]


def time_calls(fn, n: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``n`` calls of ``fn(i)``."""
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(i)
    return time.process_time() - c0, time.perf_counter() - w0


def _shape_stats(work: list, n: int, seed: int, style: str) -> dict:
    """Median side, fraction cut by the border and overlap with the foreground of ``n`` shapes."""
    from pseudohealthy.data.anomalies import draw_shape

    rng = np.random.default_rng([seed, 101])
    sides, cut, overlap = [], 0, []
    for i in range(n):
        fg = work[i % len(work)][1]
        shape = draw_shape(fg, rng, style=style)
        sides += list(shape.sides)
        cut += int(shape.mask.sum() < shape.area)
        overlap.append(np.count_nonzero(shape.mask & fg) / shape.mask.sum())
    overlap = np.array(overlap)
    return {
        "side_median": float(np.median(sides)),
        "cut_fraction": cut / n,
        "overlap_median": float(np.median(overlap)),
        "overlap_p05": float(np.quantile(overlap, 0.05)),
        "overlap_below_half": float(np.mean(overlap < 0.5)),
    }


def _task_stats(work: list, n: int, seed: int, style: str) -> dict:
    """Largest displacement of the deformations and the intensity change's amplitude."""
    from pseudohealthy.data.anomalies import apply_task
    from pseudohealthy.data.anomalies.deform import sample_deformation

    rng = np.random.default_rng([seed, 102])
    push = [
        sample_deformation(
            work[i % len(work)][1], rng, ("sink", "source")[i % 2], style=style
        ).displacement.max(initial=0.0)
        for i in range(n)
    ]
    peak, mean = [], []
    for i in range(n):
        image, fg, _ = work[i % len(work)]
        out, mask = apply_task("intensity", image, fg, rng, style=style)
        change = np.abs(out - image)[mask]
        peak.append(change.max())
        mean.append(change.mean())
    return {
        "displacement_median": float(np.median(push)),
        "intensity_peak_median": float(np.median(peak)),
        "intensity_mean_median": float(np.median(mean)),
    }


def _time_styles(work: list, inter: list, n: int, seed: int, styles: tuple[str, ...]) -> dict:
    """CPU milliseconds per sample of each task and style, the styles interleaved task by task."""
    from pseudohealthy.data.anomalies import TASKS, apply_task

    times: dict = {style: {} for style in styles}
    for t, name in enumerate(TASKS):
        for style in styles:
            rng = np.random.default_rng([seed, t])

            def one(i: int, t: int = t, rng: np.random.Generator = rng, style: str = style) -> None:
                image, fg, intra = work[i % len(work)]
                apply_task(t, image, fg, rng, intra_sources=intra, inter_sources=inter, style=style)

            one(0)
            cpu, _ = time_calls(one, n)
            times[style][name] = 1000.0 * cpu / n
    return times


def compare_styles(work: list, inter: list, n: int, seed: int) -> dict:
    """Print and return the reference-vs-legacy table."""
    from pseudohealthy.data.anomalies import STYLES

    stats = {s: {**_shape_stats(work, n, seed, s), **_task_stats(work, n, seed, s)} for s in STYLES}
    times = _time_styles(work, inter, n, seed, STYLES)
    print(f"{'measure':28s}" + "".join(f"{s:>12s}" for s in STYLES))
    for key in stats[STYLES[0]]:
        print(f"{key:28s}" + "".join(f"{stats[s][key]:12.3f}" for s in STYLES))
    for name in times[STYLES[0]]:
        row = "".join(f"{times[s][name]:12.2f}" for s in STYLES)
        ratio = times[STYLES[0]][name] / times[STYLES[1]][name]
        print(f"{'ms/sample ' + name:28s}{row}   ratio {ratio:.2f}")
    total = {s: sum(times[s].values()) for s in STYLES}
    print(f"{'ms/sample all tasks':28s}" + "".join(f"{total[s]:12.2f}" for s in STYLES), end="")
    print(f"   ratio {total[STYLES[0]] / total[STYLES[1]]:.2f}")
    return {"stats": stats, "ms_per_sample": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one scan, fewer slices")
    parser.add_argument("-n", type=int, help="slices per task (default 400, quick 100)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--check", action="store_true", help="exit 1 when below the target")
    parser.add_argument("--compare-styles", action="store_true", help="reference vs legacy task styles")
    args = parser.parse_args(argv)
    if "torch" in sys.modules:  # not needed by the tasks; keep any torch work single-threaded
        sys.modules["torch"].set_num_threads(1)

    from pseudohealthy.data.anomalies import TASKS, Corruptor, apply_task, load_inter_sources, sample_rng
    from pseudohealthy.data.anomalies.scan import intra_sources_for

    n = args.n or (100 if args.quick else 400)
    paths = [DATA / s for s in (SCANS[:1] if args.quick else SCANS)]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"missing benchmark scans: {', '.join(missing)}", file=sys.stderr)
        return 2
    scans = load_slices(paths, args.size)
    # the central 80% of each scan's foreground slices, with their intra-source samplers
    work = []
    for prep in scans:
        k = len(prep.indices)
        for j in range(int(0.1 * k), int(0.9 * k)):
            work.append((prep.images[j], prep.masks[j], intra_sources_for(prep.images, prep.indices, j)))
    inter = load_inter_sources(size=args.size)  # cached: loading is not timed
    print(
        f"{len(work)} slices {args.size}x{args.size} from {len(scans)} scan(s); {n} corruptions per task; "
        "single-threaded"
    )
    if args.compare_styles:
        table = compare_styles(work, inter, n, args.seed)
        if args.json:
            from pseudohealthy.data.files import write_json

            write_json(args.json, table)
        return 0

    results = {}
    for t, name in enumerate(TASKS):
        rng = np.random.default_rng([args.seed, t])

        def one(i: int, t: int = t, rng: np.random.Generator = rng) -> None:
            image, fg, intra = work[i % len(work)]
            apply_task(t, image, fg, rng, intra_sources=intra, inter_sources=inter)

        one(0)  # warm-up (imports, caches)
        cpu, wall = time_calls(one, n)
        results[name] = {"per_core": n / cpu, "wall": n / wall}
        print(f"  {name:14s} {n / cpu:8.0f} slices/s per core   ({n / wall:6.0f}/s wall)")

    rates = np.array([r["per_core"] for r in results.values()])
    mean_rate = float(rates.mean())
    pooled = float(len(rates) / np.sum(1.0 / rates))  # equal numbers of each task
    print(f"  {'mean':14s} {mean_rate:8.0f} slices/s per core   (pooled over tasks: {pooled:.0f}/s)")

    corruptor = Corruptor(range(len(TASKS)), inter_sources=inter)

    def draw(i: int) -> None:
        image, fg, intra = work[i % len(work)]
        corruptor(image, fg, sample_rng(args.seed, i), intra_sources=intra)

    cpu, wall = time_calls(draw, n)
    print(f"  {'Corruptor(all)':14s} {n / cpu:8.0f} samples/s per core   (p_none 0.2, 1-4 anomalies)")
    ratio = pooled / TARGET
    verdict = "met" if ratio >= 1 else "NOT met"
    print(f"target {TARGET:.0f}/s per core: pooled rate is {ratio:.1f}x the target ({verdict})")
    if args.json:
        summary = {
            "tasks": results,
            "mean": mean_rate,
            "pooled": pooled,
            "corruptor": n / cpu,
            "target": TARGET,
        }
        from pseudohealthy.data.files import write_json

        write_json(args.json, summary)
    return 1 if args.check and ratio < 1 else 0


if __name__ == "__main__":
    sys.exit(main())
