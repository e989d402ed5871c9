"""Speed of the restoration engine against a naive loop, on slices of the bundled sample scan.

Run: ``.venv/bin/python benchmarks/bench_restore.py [--quick] [--preset cpu] [--device cpu]``.
An ensemble of randomly initialised members of a preset is written to a temporary folder (speed
does not depend on the weights). The engine (:func:`pseudohealthy.restore.restore_volume`:
slices batched, members in lockstep, autocast on CUDA) is timed against a naive loop (one
member at a time, one slice at a time, float32) that uses the same per-slice noise, so both
give the same maps (the largest difference is printed). Prints seconds per slice, seconds per
volume (extrapolated to all foreground slices of the scan) and the naive/engine ratio.
One CPU thread by default: on a small shared machine, multi-threaded small convolutions stall
on descheduled threads and the timings become noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_ensemble(folder: Path, preset: str, n_members: int):
    """``n_members`` randomly initialised checkpoints of ``preset`` in ``folder``."""
    from pseudohealthy import checkpoint, model

    cfg = model.get_preset(preset)
    for m in range(n_members):
        torch.manual_seed(m)
        net = model.build_model(cfg)
        with torch.no_grad():  # a non-zero output head, so the sampler does real work
            for p in net.unet.out.parameters():
                p.normal_(0, 0.05)
        checkpoint.save_checkpoint(net, cfg, {"fold": m}, folder / f"fold{m}")
    return checkpoint.Ensemble.from_dir(folder)


def naive_restore(prepared, ensemble, settings, slices: list[int], device) -> dict[int, np.ndarray]:
    """The reference way: every member, every slice, one at a time in float32; ensemble maps."""
    from pseudohealthy.batching import noise_draws, run_timesteps, slice_seed
    from pseudohealthy.diffusion import denoise_steps, from_model_range, slice_noise, to_model_range
    from pseudohealthy.maps import anomaly_map, ensemble_map

    schedule = ensemble.schedule
    n_draws = noise_draws(settings.sampler, len(run_timesteps(settings, schedule, None)))
    position = {int(k): j for j, k in enumerate(prepared.indices)}
    size = prepared.geometry.size
    maps: dict[int, list[np.ndarray]] = {k: [] for k in slices}
    for member in ensemble.members:
        net = member.model(device)
        for k in slices:
            j = position[k]
            cond = to_model_range(torch.from_numpy(prepared.images[j][None, None]).to(device))
            noise = slice_noise([slice_seed(settings.seed, k, member.name)], n_draws, (1, size, size), device)
            *_, (_, _, x) = denoise_steps(
                net, cond, schedule, sampler=settings.sampler, steps=settings.steps, noise=noise
            )
            rest = from_model_range(x)[0, 0].cpu().numpy()
            maps[k].append(anomaly_map(rest, prepared.images[j], prepared.masks[j]))
    return {k: ensemble_map(np.stack(v), prepared.masks[position[k]]) for k, v in maps.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny preset, 4 slices, 2 members")
    parser.add_argument("--preset", help="model preset (default: cpu; tiny with --quick)")
    parser.add_argument("--members", type=int, help="ensemble size (default 3; 2 with --quick)")
    parser.add_argument("--slices", type=int, help="slices restored (default 8; 4 with --quick)")
    parser.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim", "dpm"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, help="engine slices per batch (default: the engine's)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    from pseudohealthy.device import resolve_device
    from pseudohealthy.io import load_scan
    from pseudohealthy.restore import RestoreSettings, prepare_for, restore_volume
    from pseudohealthy.sample import sample_scan_path

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("tiny" if args.quick else "cpu")
    n_members = args.members or (2 if args.quick else 3)
    n_slices = args.slices or (4 if args.quick else 8)
    device = resolve_device(args.device)
    volume = load_scan(sample_scan_path())

    with tempfile.TemporaryDirectory() as tmp:
        ensemble = build_ensemble(Path(tmp), preset, n_members)
        settings = RestoreSettings(
            sampler=args.sampler, steps=args.steps, device=str(device), batch_size=args.batch_size
        )
        prepared = prepare_for(volume, ensemble, settings)
        fg = [int(k) for k in prepared.indices]
        mid = len(fg) // 2
        slices = fg[max(0, mid - n_slices // 2) :][:n_slices]
        warm = RestoreSettings(sampler="ddim", steps=2, device=str(device))
        restore_volume(volume, ensemble, warm, slices=slices[:1])  # load weights, warm kernels

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = restore_volume(volume, ensemble, settings, slices=slices)
        if device.type == "cuda":
            torch.cuda.synchronize()
        engine_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        naive = naive_restore(prepared, ensemble, settings, slices, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        naive_s = time.perf_counter() - t0

        geo = prepared.geometry
        diff = max(
            float(
                np.abs(np.clip(geo.from_model(naive[k]), 0, 1) - result.anomaly[:, :, k])[
                    prepared.foreground[:, :, k]
                ].max()
            )
            for k in slices
        )

    per_slice_engine, per_slice_naive = engine_s / len(slices), naive_s / len(slices)
    figures = {
        "preset": preset,
        "members": n_members,
        "slices": len(slices),
        "sampler": args.sampler,
        "steps": args.steps,
        "device": str(device),
        "autocast": result.settings["autocast"],
        "threads": torch.get_num_threads(),
        "foreground_slices_in_volume": len(fg),
        "engine_s_per_slice": per_slice_engine,
        "naive_s_per_slice": per_slice_naive,
        "engine_s_per_volume": per_slice_engine * len(fg),
        "naive_s_per_volume": per_slice_naive * len(fg),
        "speedup": per_slice_naive / per_slice_engine,
        "max_abs_map_difference": diff,
    }
    print(
        f"{preset} preset, {n_members} members, {len(slices)} slices, {args.sampler} {args.steps} steps, "
        f"{device} ({figures['autocast']}), {figures['threads']} threads"
    )
    print(f"{'':8s} {'s/slice':>9s} {'s/volume':>10s}   (volume = {len(fg)} foreground slices)")
    for name in ("engine", "naive"):
        print(f"{name:8s} {figures[f'{name}_s_per_slice']:9.3f} {figures[f'{name}_s_per_volume']:10.1f}")
    print(f"speed-up (naive / engine): {figures['speedup']:.2f}x; largest map difference {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
