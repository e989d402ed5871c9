"""Speed of training steps in float32 against bfloat16 autocast, per model preset.

Run: ``.venv/bin/python benchmarks/bench_train.py [--presets tiny,cpu] [--batch-size 16]
[--steps 5] [--repeats 5] [--json out.json]``. For each preset two copies of one seeded network
(each with its AdamW optimiser, the training loop's settings) take optimiser steps on one fixed
random batch of ``[0, 1]`` images and conditions: the steps of ``pseudohealthy.training.loop``
(the schedule's model range, :func:`~pseudohealthy.model.diffusion.training_loss` under
:func:`~pseudohealthy.device.autocast`, backward, gradient clipping, AdamW; no data loading, no
EMA). Blocks of ``--steps`` steps per precision are timed ``--repeats`` times, interleaved with
the order alternating (a busy spell on a shared machine hits both alike), after one warm-up
block each; figures are medians: steps/s and the ratio bf16 / fp32 steps/s (above 1: bf16 is
faster), and the last block's mean loss of each. One CPU thread by default (see
``bench_restore.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["COMPARED", "bench_train_preset", "main"]

COMPARED = ("fp32", "bf16")
"""The precisions timed against each other (the reference first)."""


class _Trainer:
    """One network and its optimiser, stepping in one precision (the loop's training step)."""

    def __init__(self, net: torch.nn.Module, precision: str, config, schedule, device: torch.device):
        self.net, self.precision, self.config, self.schedule, self.device = (
            net,
            precision,
            config,
            schedule,
            device,
        )
        self.optimizer = torch.optim.AdamW(
            net.parameters(), lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
        )
        self.generator = torch.Generator(device=device).manual_seed(0)

    def step(self, x0: torch.Tensor, cond: torch.Tensor | None) -> float:
        from pseudohealthy.device import autocast
        from pseudohealthy.model.diffusion import training_loss

        with autocast(self.device, self.precision):
            loss = training_loss(
                self.net,
                x0,
                cond,
                self.schedule,
                generator=self.generator,
                noise_offset=self.config.noise_offset,
                min_snr_gamma=self.config.min_snr_gamma,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def block(self, x0: torch.Tensor, cond: torch.Tensor | None, steps: int) -> tuple[float, float]:
        """``(seconds, mean loss)`` of ``steps`` steps."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        losses = [self.step(x0, cond) for _ in range(steps)]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0, float(np.mean(losses))


def _batch(schedule, size: int, batch: int, conditioned: bool, device: torch.device):
    """A fixed random batch in the schedule's model range: ``(x0, cond or None)``."""
    gen = torch.Generator().manual_seed(1)
    x01 = torch.rand((batch, 1, size, size), generator=gen)
    cond01 = (x01 + 0.2 * torch.rand(x01.shape, generator=gen)).clamp(0, 1)
    x0 = schedule.to_model(x01).to(device)
    return x0, schedule.to_model(cond01).to(device) if conditioned else None


def bench_train_preset(preset: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Steps/s of :data:`COMPARED` for ``preset`` (medians of interleaved blocks)."""
    from pseudohealthy.device import describe_precision
    from pseudohealthy.model.network import build_model, count_parameters
    from pseudohealthy.training.config import TrainConfig

    config = TrainConfig.for_preset(preset, batch_size=args.batch_size)
    model_cfg = config.model_config()
    schedule = config.schedule()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_model(model_cfg).to(device).train()
    trainers = {name: _Trainer(copy.deepcopy(net), name, config, schedule, device) for name in COMPARED}
    x0, cond = _batch(schedule, model_cfg.image_size, args.batch_size, model_cfg.conditioned, device)
    for trainer in trainers.values():
        trainer.block(x0, cond, 1)  # warm-up
    blocks: dict[str, list[tuple[float, float]]] = {name: [] for name in COMPARED}
    for r in range(args.repeats):
        for name in COMPARED if r % 2 == 0 else COMPARED[::-1]:
            blocks[name].append(trainers[name].block(x0, cond, args.steps))
    fig: dict[str, Any] = {
        "preset": preset,
        "image_size": model_cfg.image_size,
        "parameters": count_parameters(net),
        "batch_size": args.batch_size,
        "steps_per_block": args.steps,
        "repeats": args.repeats,
        "blocks_s": {name: [b[0] for b in v] for name, v in blocks.items()},
    }
    for name, v in blocks.items():
        secs = float(np.median([b[0] for b in v]))
        fig[name] = {
            "precision": describe_precision(device, name),
            "s_per_step": secs / args.steps,
            "steps_per_s": args.steps / secs,
            "last_mean_loss": v[-1][1],
        }
    fig["speed_ratio"] = fig[COMPARED[1]]["steps_per_s"] / fig[COMPARED[0]]["steps_per_s"]
    return fig


def _print(fig: dict[str, Any]) -> None:
    print(
        f"\n{fig['preset']} preset ({fig['image_size']} px, {fig['parameters'] / 1e6:.2f}M parameters), "
        f"batch {fig['batch_size']}, medians of {fig['repeats']} interleaved blocks of "
        f"{fig['steps_per_block']} steps"
    )
    for name in COMPARED:
        r = fig[name]
        print(
            f"{name:5s} {r['steps_per_s']:8.3f} steps/s {1e3 * r['s_per_step']:9.1f} ms/step  "
            f"loss {r['last_mean_loss']:.4f}  [{r['precision']}]"
        )
    spread = ", ".join(f"{n} {min(v):.2f}-{max(v):.2f} s" for n, v in fig["blocks_s"].items())
    print(f"{COMPARED[1]}/{COMPARED[0]} steps/s: {fig['speed_ratio']:.3f} (block range: {spread})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="tiny,cpu", help="comma-separated presets (default tiny,cpu)")
    parser.add_argument("--batch-size", type=int, default=16, help="default 16 (the reference's)")
    parser.add_argument("--steps", type=int, default=5, help="optimiser steps per timed block (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per precision (default 5)")
    parser.add_argument("--device", default="cpu", help="default cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's default)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file ('-': stdout)")
    args = parser.parse_args(argv)

    from pseudohealthy.device import cpu_bf16_flag, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"device {device} ({name}), torch {torch.__version__}, CPU bf16 flag: {cpu_bf16_flag()}")
    figures: dict[str, Any] = {"device": str(device), "device_name": name, "torch": torch.__version__}
    figures["cpu_bf16_flag"] = cpu_bf16_flag()
    figures["presets"] = []
    for preset in args.presets.split(","):
        fig = bench_train_preset(preset.strip(), args, device)
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
