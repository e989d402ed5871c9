"""Copy the members of a training run into a compact ensemble folder (weights, JSON, training log).

Run: ``.venv/bin/python scripts/export_ensemble.py RUN_DIR OUT_DIR [--half]``.
Only what restoration needs is kept (``model.safetensors``, ``pseudohealthy.json``) plus each
member's ``log.csv``; the resumable training state is left behind. ``--half`` stores the
weights in float16 (half the size; loaded back as float32).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from pseudohealthy.data.files import atomic_write
from pseudohealthy.model.checkpoint import RESERVED, Ensemble, load_checkpoint, save_checkpoint


def export(run_dir: Path, out_dir: Path, half: bool = False) -> list[Path]:
    """Write every member of ``run_dir`` into ``out_dir/<member>``; returns the member folders."""
    ensemble = Ensemble.from_dir(run_dir)
    written = []
    for member in ensemble.members:
        model, info = load_checkpoint(member.path)
        meta = {k: v for k, v in info.items() if k not in RESERVED and k != "path"}
        target = out_dir / member.name
        save_checkpoint(
            model,
            model.config,
            meta,
            target,
            schedule=member.schedule,
            weights_dtype=torch.float16 if half else None,
        )
        log = Path(member.path) / "log.csv"
        if log.is_file():
            atomic_write(target / "log.csv", lambda tmp, src=log: shutil.copyfile(src, tmp))
        written.append(target)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--half", action="store_true", help="store float16 weights")
    args = parser.parse_args()
    for folder in export(args.run_dir, args.out_dir, args.half):
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        print(f"{folder}: {size:.1f} MiB")


if __name__ == "__main__":
    main()
