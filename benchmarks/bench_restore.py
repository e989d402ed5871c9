"""Speed of the restoration engine against the naive reference loop, on slices of the sample scan.

Run: ``.venv/bin/python benchmarks/bench_restore.py [--quick] [--presets paper,cpu] [--json out.json]``.
For each preset an ensemble of randomly initialised members is written to a temporary folder
(speed does not depend on the weights) and, on the same slices of the bundled sample scan, the
engine (:func:`pseudohealthy.engine.restore.restore_volume`: slices batched, members in lockstep,
autocast on CUDA) is timed against :func:`pseudohealthy.engine.reference.naive_maps` (one member and
one slice at a time, float32), which draws the same noise, so both give the same maps (the
largest difference is printed; with autocast on CUDA it is the mixed-precision error).

Figures: slices/s, s/volume (extrapolated to the sample scan's foreground slice count at the
measured members and steps; also in process CPU seconds, robust on a busy machine), s per UNet
pass (slice x member x step: scale it to other ensembles and step counts), the naive/engine
speed-up (per slice), the latency of one slice restored alone (the slice on screen), peak host
memory (peak RSS of each phase) and, on CUDA, peak GPU
memory and the achieved TFLOP/s against the device's dense bf16 peak (UNet FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode`` on one forward pass).
Defaults: presets ``paper,cpu`` (``paper:10,cpu:3`` sets members per preset; else ``--members``,
10), the library's default sampler and steps, 8 slices on the CPU and 64 on CUDA, where the
naive loop does only 4 (its cost is linear in the slices). ``--quick``: CPU-friendly (tiny and
cpu presets, 2 members, 4 slices, ddim 4 steps). The paper preset on a CPU: e.g. ``--presets
paper --members 1 --slices 1 --steps 2``. ``--repeats N`` times engine and naive loop N times,
interleaved, and reports
medians (a shared machine's load then hits both alike). ``--compile MODE`` adds a third
contestant, the engine with ``torch.compile``'d members (compiled before timing; the time is
reported), timed interleaved with the eager engine.
One CPU thread by default: on a small shared machine, multi-threaded small convolutions stall
on descheduled threads and the timings become noise.

``--precision-compare``: instead, the engine in fp32 against bf16 autocast (each preset's random
ensemble, or ``--ensemble demo`` / a folder), ``--repeats`` interleaved runs each (the order
alternates), medians: the wall and CPU time ratios fp32 / bf16 (above 1: bf16 is faster), the
largest and mean absolute difference of the bf16 maps to the fp32 maps over the restored
foreground, and AP_p of both against the sample scan's lesion mask on the restored slices.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pseudohealthy.engine.defaults import COMPILE_MODES, DEFAULT_SAMPLER, SAMPLERS, default_steps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu import PEAK_TFLOPS, device_peak_tflops, unet_flops  # PEAK_TFLOPS: re-exported

__all__ = [
    "PEAK_TFLOPS",
    "bench_preset",
    "build_ensemble",
    "compare_precisions",
    "device_peak_tflops",
    "main",
    "unet_flops",
]

COMPARED = ("fp32", "bf16")
"""The precisions ``--precision-compare`` times against each other (the reference first)."""


def build_ensemble(folder: Path, preset: str, n_members: int):
    """``n_members`` randomly initialised checkpoints of ``preset`` in ``folder``, loaded."""
    from pseudohealthy.engine.reference import random_ensemble
    from pseudohealthy.model.checkpoint import Ensemble

    return Ensemble.from_dir(random_ensemble(folder, preset, n_members))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``VmHWM``; else ``ru_maxrss``, lifetime peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float, float, float | None]:
    """``(result, wall s, process CPU s, peak host MiB, peak GPU MiB or None)`` of ``fn()``.

    Process CPU seconds stay meaningful on a busy machine, where wall time counts waiting too.
    """
    _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    gpu = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gpu = torch.cuda.max_memory_allocated(device) / 2**20
    return out, time.perf_counter() - t0, time.process_time() - c0, _peak_rss_mb(), gpu


def _median_run(runs: list[tuple]) -> tuple:
    """``(result, median wall s, median CPU s, peak host MiB, peak GPU MiB)`` over repeated
    :func:`_measure` runs (peaks: the largest seen)."""
    gpu = [r[4] for r in runs if r[4] is not None]
    return (
        runs[-1][0],
        float(np.median([r[1] for r in runs])),
        float(np.median([r[2] for r in runs])),
        max(r[3] for r in runs),
        max(gpu) if gpu else None,
    )


def bench_preset(
    preset: str, n_members: int, args: argparse.Namespace, volume, device: torch.device
) -> dict[str, Any]:
    """Engine vs naive loop for one preset on the central foreground slices of ``volume``.

    The naive loop restores the first ``args.naive_slices`` of them (its cost is linear in the
    slices); one more engine run restores one slice alone (the latency of the slice on screen).
    """
    from pseudohealthy.engine.reference import naive_maps
    from pseudohealthy.engine.restore import prepare_for, restore_volume
    from pseudohealthy.engine.settings import RestoreSettings

    with tempfile.TemporaryDirectory() as tmp:
        ensemble = build_ensemble(Path(tmp), preset, n_members)
        settings = RestoreSettings(
            sampler=args.sampler, steps=args.steps, device=str(device), batch_size=args.batch_size
        )
        prepared = prepare_for(volume, ensemble, settings)
        fg = [int(k) for k in prepared.indices]
        mid = len(fg) // 2
        slices = fg[max(0, mid - args.slices // 2) :][: args.slices]
        warm = RestoreSettings(**{**settings.to_dict(), "sampler": "ddim", "steps": 1})
        restore_volume(volume, ensemble, warm, slices=slices[:1])  # load weights, warm kernels
        compiled = RestoreSettings(**{**settings.to_dict(), "compile": args.compile})
        warm_s = 0.0
        if args.compile:  # compile for the batch sizes of the timed runs (one slice, then batches)
            t_warm = time.perf_counter()
            warm_compiled = RestoreSettings(**{**warm.to_dict(), "compile": args.compile})
            restore_volume(volume, ensemble, warm_compiled, slices=slices[:1])
            restore_volume(volume, ensemble, warm_compiled, slices=slices)
            warm_s = time.perf_counter() - t_warm
        flops = unet_flops(preset)
        n_params = sum(p.numel() for p in ensemble.members[0].model(device).parameters())

        naive_slices = slices[: args.naive_slices or len(slices)]
        contestants: dict[str, tuple[Callable[[], Any], int]] = {
            "engine": (lambda: restore_volume(volume, ensemble, settings, slices=slices), len(slices)),
            "one": (lambda: restore_volume(volume, ensemble, settings, slices=slices[:1]), 1),
            "naive": (
                lambda: naive_maps(
                    prepare_for(volume, ensemble, settings), ensemble, settings, naive_slices, device
                ),
                len(naive_slices),
            ),
        }
        if args.compile:
            contestants["compiled"] = (
                lambda: restore_volume(volume, ensemble, compiled, slices=slices),
                len(slices),
            )
            contestants["compiled_one"] = (
                lambda: restore_volume(volume, ensemble, compiled, slices=slices[:1]),
                1,
            )
        runs: dict[str, list[tuple]] = {name: [] for name in contestants}
        for _ in range(args.repeats):  # interleaved, so that a busy spell hits every contestant alike
            for name, (fn, _n) in contestants.items():
                runs[name].append(_measure(fn, device))
        medians = {name: _median_run(measured) for name, measured in runs.items()}
        result, naive = medians["engine"][0], medians["naive"][0]
        geo = prepared.geometry

        def largest_difference(restored) -> float:
            return max(
                float(
                    np.abs(np.clip(geo.from_model(naive[k]), 0, 1) - restored.anomaly[:, :, k])[
                        prepared.foreground[:, :, k]
                    ].max()
                )
                for k in naive_slices
            )

        diff = largest_difference(result)
        diff_compiled = largest_difference(medians["compiled"][0]) if args.compile else None
        ensemble.release()

    per_slice = n_members * result.settings["n_steps"]  # UNet passes
    peak = device_peak_tflops(device)
    fig: dict[str, Any] = {
        "preset": preset,
        "image_size": ensemble.image_size,
        "parameters": n_params,
        "members": n_members,
        "slices": len(slices),
        "naive_slices": len(naive_slices),
        "sampler": args.sampler,
        "steps": args.steps,
        "autocast": result.settings["autocast"],
        "foreground_slices_in_volume": len(fg),
        "unet_gflop_per_pass": flops / 1e9,
        "device_peak_tflops": peak,
        "max_abs_map_difference": diff,
        "engine_one_slice_s": medians["one"][1],
        "repeats": args.repeats,
        "runs_s": {name: [r[1] for r in measured] for name, measured in runs.items()},
        "compile": args.compile,
        "compile_warmup_s": warm_s,
    }
    timed = [name for name in ("engine", "naive", "compiled") if name in medians]
    for name in timed:
        _, secs, cpu, rss, gpu = medians[name]
        n = contestants[name][1]
        passes = n * per_slice
        tflops = flops * passes / secs / 1e12
        fig[name] = {
            "seconds": secs,
            "slices_per_s": n / secs,
            "s_per_volume": secs / n * len(fg),
            "cpu_seconds": cpu,
            "cpu_s_per_volume": cpu / n * len(fg),
            "s_per_unet_pass": secs / passes,
            "peak_host_mib": rss,
            "peak_gpu_mib": gpu,
            "tflops": tflops,
            "fraction_of_peak": None if peak is None else tflops / peak,
        }
    if args.compile:
        fig["compiled_one_slice_s"] = medians["compiled_one"][1]
        fig["compiled_max_abs_map_difference"] = diff_compiled
        fig["compile_speedup"] = fig["engine"]["s_per_volume"] / fig["compiled"]["s_per_volume"]
    fig["speedup"] = fig["naive"]["s_per_volume"] / fig["engine"]["s_per_volume"]
    fig["speedup_cpu_time"] = fig["naive"]["cpu_s_per_volume"] / fig["engine"]["cpu_s_per_volume"]
    return fig


def _slices_of(prepared, count: int) -> list[int]:
    """``count`` central foreground slices (canonical axial indices) of ``prepared``."""
    fg = [int(k) for k in prepared.indices]
    mid = len(fg) // 2
    return fg[max(0, mid - count // 2) :][:count]


def _map_figures(results: dict[str, Any], prepared, lesion: np.ndarray, slices: list[int]) -> dict[str, Any]:
    """Differences of each precision's maps to the first's (restored foreground) and AP_p."""
    from pseudohealthy.evaluation.metrics import binary_curve

    ref = results[COMPARED[0]].anomaly[:, :, slices]
    fg = prepared.foreground[:, :, slices]
    labels = lesion[:, :, slices]
    out: dict[str, Any] = {}
    for name, result in results.items():
        maps = result.anomaly[:, :, slices]
        diff = np.abs(maps.astype(np.float64) - ref)[fg]
        ap = binary_curve(maps.ravel(), labels.ravel()).average_precision() if labels.any() else None
        out[name] = {"max_abs_map_difference": float(diff.max()), "ap_pixel": ap}
        out[name]["mean_abs_map_difference"] = float(diff.mean())
    return out


def _save_maps(path: Path, medians: dict[str, tuple], prepared, slices: list[int]) -> Path:
    """``--save-maps``: each precision's map, the slices and the foreground there, ``(X, Y, n)``."""
    from pseudohealthy.data.files import atomic_write

    arrays = {name: m[0].anomaly[:, :, slices] for name, m in medians.items()}
    arrays |= {"slices": np.asarray(slices), "foreground": prepared.foreground[:, :, slices]}
    return atomic_write(path, lambda tmp: np.savez_compressed(tmp, **arrays))


def compare_precisions(
    ensemble, label: str, args: argparse.Namespace, volume, lesion: np.ndarray, device: torch.device
) -> dict[str, Any]:
    """The engine in each of :data:`COMPARED` on the central foreground slices of ``volume``.

    Runs are interleaved ``args.repeats`` times, alternating the order; medians of wall and
    process CPU seconds. Map figures from the last run of each (the runs are deterministic).
    """
    from pseudohealthy.device import describe_precision
    from pseudohealthy.engine.restore import prepare_for, restore_volume
    from pseudohealthy.engine.settings import RestoreSettings

    base = {"sampler": args.sampler, "steps": args.steps, "device": str(device)}
    base["batch_size"] = args.batch_size
    settings = {name: RestoreSettings(**base, precision=name) for name in COMPARED}
    prepared = prepare_for(volume, ensemble, settings[COMPARED[0]])
    slices = _slices_of(prepared, args.slices)
    for one in settings.values():  # load weights, warm the kernels of both precisions
        restore_volume(volume, ensemble, RestoreSettings(**{**one.to_dict(), "steps": 1}), slices=slices[:1])
    runs: dict[str, list[tuple]] = {name: [] for name in COMPARED}
    for r in range(args.repeats):
        for name in COMPARED if r % 2 == 0 else COMPARED[::-1]:
            runs[name].append(
                _measure(lambda n=name: restore_volume(volume, ensemble, settings[n], slices=slices), device)
            )
    medians = {name: _median_run(measured) for name, measured in runs.items()}
    fig: dict[str, Any] = {
        "ensemble": label,
        "members": len(ensemble.members),
        "image_size": ensemble.image_size,
        "slices": len(slices),
        "sampler": args.sampler,
        "steps": args.steps,
        "repeats": args.repeats,
        "precisions": {name: describe_precision(device, name) for name in COMPARED},
        "runs_s": {name: [m[1] for m in measured] for name, measured in runs.items()},
        "lesion_pixels": int(lesion[:, :, slices].sum()),
    }
    maps = _map_figures({name: m[0] for name, m in medians.items()}, prepared, lesion, slices)
    if getattr(args, "save_maps", None):
        _save_maps(args.save_maps / f"{Path(label.split()[0]).name}_maps.npz", medians, prepared, slices)
    for name, (_, wall, cpu, rss, _gpu) in medians.items():
        fig[name] = {"seconds": wall, "cpu_seconds": cpu, "slices_per_s": len(slices) / wall, **maps[name]}
        fig[name]["peak_host_mib"] = rss
    ref, low = (fig[name] for name in COMPARED)
    fig["wall_ratio"] = ref["seconds"] / low["seconds"]
    fig["cpu_ratio"] = ref["cpu_seconds"] / low["cpu_seconds"]
    aps = (ref["ap_pixel"], low["ap_pixel"])
    fig["ap_pixel_difference"] = None if None in aps else aps[1] - aps[0]
    return fig


def _print_compare(fig: dict[str, Any]) -> None:
    ref, low = COMPARED
    print(
        f"\n{fig['ensemble']} ({fig['members']} members, {fig['image_size']} px), {fig['slices']} slices, "
        f"{fig['sampler']} {fig['steps']} steps; medians of {fig['repeats']} interleaved runs"
    )
    for name in COMPARED:
        r = fig[name]
        ap = "-" if r["ap_pixel"] is None else f"{r['ap_pixel']:.4f}"
        print(
            f"{name:5s} {r['seconds']:8.2f} s wall {r['cpu_seconds']:8.2f} s CPU  max|diff| "
            f"{r['max_abs_map_difference']:.2e} mean|diff| {r['mean_abs_map_difference']:.2e}  AP_p {ap}"
            f"   [{fig['precisions'][name]}]"
        )
    dap = fig["ap_pixel_difference"]
    print(
        f"{ref}/{low} time ratio: {fig['wall_ratio']:.3f} wall, {fig['cpu_ratio']:.3f} CPU "
        f"(>1: {low} faster); "
        f"AP_p {low} - {ref}: {'-' if dap is None else f'{dap:+.5f}'} ({fig['lesion_pixels']} lesion pixels)"
    )


def _run_compare(args: argparse.Namespace, presets: list[str], volume, device: torch.device) -> list[dict]:
    """``--precision-compare`` over ``--ensemble`` or each preset's random ensemble."""
    from pseudohealthy.data.io import load_mask
    from pseudohealthy.data.sample import resolve_ensemble, sample_mask_path
    from pseudohealthy.model.checkpoint import Ensemble

    lesion = load_mask(sample_mask_path(), volume)
    figs = []
    if args.ensemble:
        ensemble = Ensemble.from_dir(resolve_ensemble(args.ensemble))
        figs.append(compare_precisions(ensemble, args.ensemble, args, volume, lesion, device))
    for preset in [] if args.ensemble else presets:
        preset_name, _, members = preset.strip().partition(":")
        with tempfile.TemporaryDirectory() as tmp:
            ensemble = build_ensemble(Path(tmp), preset_name, int(members or args.members))
            label = f"{preset_name} preset (random weights)"
            figs.append(compare_precisions(ensemble, label, args, volume, lesion, device))
            ensemble.release()
    for fig in figs:
        _print_compare(fig)
    return figs


def _print(fig: dict[str, Any]) -> None:
    print(
        f"\n{fig['preset']} preset ({fig['image_size']} px, {fig['parameters'] / 1e6:.2f}M parameters, "
        f"{fig['unet_gflop_per_pass']:.2f} GFLOP/pass), {fig['members']} members, {fig['slices']} slices "
        f"({fig['naive_slices']} naive), "
        f"{fig['sampler']} {fig['steps']} steps, autocast {fig['autocast']}"
    )
    print(
        f"{'':8s} {'slices/s':>9s} {'s/volume':>9s} {'CPU s/vol':>9s} {'ms/pass':>8s} {'host MiB':>9s} "
        f"{'GPU MiB':>8s} {'TFLOP/s':>8s} {'of peak':>8s}"
    )
    for name in ("engine", "naive", "compiled"):
        if name not in fig:
            continue
        r = fig[name]
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        frac = "unknown" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:.1f}%"
        print(
            f"{name:8s} {r['slices_per_s']:9.3f} {r['s_per_volume']:9.1f} {r['cpu_s_per_volume']:9.1f} "
            f"{1e3 * r['s_per_unet_pass']:8.2f} "
            f"{r['peak_host_mib']:9.0f} {gpu:>8s} {r['tflops']:8.4f} {frac:>8s}"
        )
    print(
        f"speed-up (naive / engine): {fig['speedup']:.2f}x wall, {fig['speedup_cpu_time']:.2f}x CPU time; "
        "largest map difference "
        f"{fig['max_abs_map_difference']:.2e}; volume = {fig['foreground_slices_in_volume']} slices"
    )
    print(f"one slice alone (engine): {fig['engine_one_slice_s']:.2f} s")
    if fig["compile"]:
        print(
            f"torch.compile {fig['compile']}: engine / compiled {fig['compile_speedup']:.2f}x; one slice "
            f"{fig['compiled_one_slice_s']:.2f} s; largest map difference to the naive loop "
            f"{fig['compiled_max_abs_map_difference']:.2e}; compiling took {fig['compile_warmup_s']:.1f} s"
        )
    if fig["repeats"] > 1:
        spread = ", ".join(f"{name} {min(v):.1f}-{max(v):.1f} s" for name, v in fig["runs_s"].items())
        print(f"medians of {fig['repeats']} interleaved runs (range: {spread})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="CPU-friendly: tiny,cpu presets, 2 members, 4 slices"
    )
    parser.add_argument(
        "--presets",
        help="comma-separated presets, each optionally :members (e.g. paper:10,cpu:3; default paper,cpu; "
        "tiny,cpu with --quick)",
    )
    parser.add_argument("--preset", help=argparse.SUPPRESS)  # old single-preset spelling
    parser.add_argument("--members", type=int, help="ensemble size (default 10; 2 with --quick)")
    parser.add_argument(
        "--naive-slices", type=int, help="slices for the naive loop (default: all on the CPU, 4 on CUDA)"
    )
    parser.add_argument(
        "--slices", type=int, help="slices restored (default 8 on the CPU, 64 on CUDA; 4 with --quick)"
    )
    parser.add_argument(
        "--sampler", default=None, choices=SAMPLERS, help=f"default {DEFAULT_SAMPLER} (ddim with --quick)"
    )
    parser.add_argument("--steps", type=int, help="sampler steps (default: the sampler's; 4 with --quick)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, help="engine slices per batch (default: the engine's)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time engine and naive loop N times, interleaved; report medians (default 1)",
    )
    parser.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="also time the engine with torch.compile'd members, interleaved with the eager engine",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)"
    )
    parser.add_argument(
        "--precision-compare",
        action="store_true",
        help="time the engine in fp32 against bf16 autocast, compare their maps (not the naive loop)",
    )
    parser.add_argument("--ensemble", help="with --precision-compare: a bundled ensemble name or folder")
    parser.add_argument(
        "--save-maps", type=Path, help="with --precision-compare: each ensemble's maps to DIR/<name>_maps.npz"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file ('-': stdout)")
    args = parser.parse_args(argv)

    from pseudohealthy.data.io import load_scan
    from pseudohealthy.data.sample import sample_scan_path
    from pseudohealthy.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    presets = (args.presets or args.preset or ("tiny,cpu" if args.quick else "paper,cpu")).split(",")
    args.members = args.members or (2 if args.quick else 10)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.slices = args.slices or (4 if args.quick else 64 if cuda else 8)
    args.naive_slices = args.naive_slices or (4 if cuda else None)
    args.sampler = args.sampler or ("ddim" if args.quick else DEFAULT_SAMPLER)
    args.steps = args.steps or (4 if args.quick else default_steps(args.sampler))
    volume = load_scan(sample_scan_path())
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device {device} ({name}), torch {torch.__version__}")

    figures = {"device": str(device), "device_name": name, "torch": torch.__version__, "presets": []}
    if args.precision_compare:
        figures["precision_compare"] = _run_compare(args, presets, volume, device)
        presets = []
    for preset in presets:
        preset_name, _, members = preset.strip().partition(":")
        fig = bench_preset(preset_name, int(members or args.members), args, volume, device)
        figures["presets"].append(fig)
        _print(fig)
    if args.json:
        text = json.dumps(figures, indent=2) + "\n"
        if str(args.json) == "-":
            sys.stdout.write(text)
        else:
            from pseudohealthy.data.files import write_text

            write_text(args.json, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
