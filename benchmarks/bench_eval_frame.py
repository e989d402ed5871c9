"""The reference's evaluation frame against ours, one departure at a time, on dev data.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_eval_frame.py [--out DIR]
[--brats-slices 8] [--mslub-slices 16] [--device auto]``.

The bundled demo ensemble (3 FLAIR members, 64 px) restores each dev scan once per square
(:func:`pseudohealthy.evaluation.frame.restore_frames`: model-frame input, unmasked maps and
restorations), and every row scores those same restorations (no row restores again):

- ``reference``: model frame, foreground ``input > 0`` (with its halo), squares cropped, every
  evaluated slice kept (:data:`~pseudohealthy.evaluation.frame.REFERENCE_RULES`);
- one row per departure from it: ``native frame`` (map -> scan grid, zeroed outside the brain
  there -> model-size frame), ``no halo`` (the resized brain mask), ``pad`` (padded squares:
  restored again; BraTS slices are square, so the same), ``drop <1%`` (slices with under 1% brain
  dropped);
- ``ours`` (all four departures: the earlier ``evaluate``) at the model's size and at 128 px.

Data (dev only; never BraTS patient 0006, the demo's test patient): BraTS 2013 patients
0003-0005 FLAIR, ``--brats-slices`` evenly spaced of the axial slices with a tumour voxel (the
demo trained on their lesion-free slices); MSLUB patients 07 and 19 FLAIR (a FLAIR model is all
we have), ``--mslub-slices`` evenly spaced of all axial slices. Pooled per data set; the intensity
baseline (Meissen et al.) is scored in the same frame beside each row. Writes ``OUT/table.md``
and ``OUT/results.json`` (through :mod:`pseudohealthy.data.files`).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from pseudohealthy.data.files import write_json, write_text
from pseudohealthy.data.io import load_mask, load_scan
from pseudohealthy.data.preprocess import SliceGeometry, foreground_mask
from pseudohealthy.data.sample import resolve_ensemble
from pseudohealthy.device import resolve_device
from pseudohealthy.engine.settings import RestoreSettings
from pseudohealthy.evaluation.cases import evenly_spaced
from pseudohealthy.evaluation.frame import (
    NATIVE_RULES,
    NATIVE_SIZE,
    REFERENCE_RULES,
    FrameRestoration,
    FrameRules,
    foreground_slices,
    frame_slices,
    restore_frames,
)
from pseudohealthy.evaluation.pooling import BASELINE_KEY, EvalEntry, evaluate_maps
from pseudohealthy.model.checkpoint import Ensemble

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "lesion"
BRATS = ("brats_2013_pat0003_1", "brats_2013_pat0004_1", "brats_2013_pat0005_1")
MSLUB = ("patient07", "patient19")
ROWS: dict[str, tuple[FrameRules, int | None]] = {
    "reference": (REFERENCE_RULES, None),
    "native frame": (replace(REFERENCE_RULES, frame="native"), None),
    "no halo": (replace(REFERENCE_RULES, foreground="mask"), None),
    "pad": (replace(REFERENCE_RULES, square="pad"), None),
    "drop <1%": (replace(REFERENCE_RULES, min_foreground=0.01), None),
    "ours (all four)": (NATIVE_RULES, None),
    f"ours at {NATIVE_SIZE} px": (NATIVE_RULES, NATIVE_SIZE),
}
COLUMNS = (("AP_p", "ap_pixel"), ("[Dsc]", "best_dice"), ("AP_i", "ap_image"), ("AUROC", "auroc"))


class Case:
    """One dev scan, its candidate slices and its restorations per square."""

    def __init__(self, name: str, scan: Path, lesion: Path, brain: Path | None, slices: str, n: int):
        self.name = name
        self.volume = load_scan(scan)
        self.lesion = load_mask(lesion, self.volume)
        self.brain = load_mask(brain, self.volume) if brain else None
        self.foreground = foreground_mask(self.volume.data, self.brain)
        pool = (
            np.flatnonzero(self.lesion.any(axis=(0, 1)))
            if slices == "lesion"
            else np.arange(self.volume.data.shape[2])
        )
        self.slices = evenly_spaced(pool, n)
        self.restored: dict[str, FrameRestoration] = {}

    def restore(self, ensemble: Ensemble, settings: RestoreSettings, models: list) -> None:
        square_slices = self.volume.data.shape[0] == self.volume.data.shape[1]
        for square in ("crop", "pad"):
            if square_slices and self.restored:  # pad == crop on square slices: the same arrays
                fr = next(iter(self.restored.values()))
                geo = SliceGeometry(fr.geometry.in_shape, fr.geometry.size, square)
                self.restored[square] = replace(fr, geometry=geo)
                continue
            self.restored[square] = restore_frames(
                self.volume,
                ensemble,
                replace(settings, square=square),
                slices=self.slices,
                brain_mask=self.brain,
                models=models,
            )

    def entry(self, rules: FrameRules, size: int | None) -> tuple[EvalEntry, int, str]:
        """The case scored by ``rules``: (entry, native frame size, square)."""
        fr = self.restored[rules.square]
        idx = self.slices
        if rules.min_foreground > 0:
            idx = np.intersect1d(idx, foreground_slices(self.foreground, rules.min_foreground))
        anomaly = fr.native_map(rules.foreground)
        image = self.volume.data
        if rules.frame == "model":
            framed = frame_slices(fr, self.lesion, rules, idx)
            return (
                EvalEntry(self.name, anomaly, self.lesion, self.foreground, image, idx, framed=framed),
                0,
                "",
            )
        entry = EvalEntry(
            self.name, anomaly, self.lesion, self.foreground, image, idx,
            normalised=fr.normalised, restoration=fr.native_restoration(),
        )  # fmt: skip
        return entry, size or fr.geometry.size, rules.square


def score(cases: list[Case], rules: FrameRules, size: int | None) -> dict:
    entries = [c.entry(rules, size) for c in cases]
    native_size = max(e[1] for e in entries) or NATIVE_SIZE
    return evaluate_maps(
        [e[0] for e in entries],
        size=native_size,
        square=rules.square,
        min_foreground=rules.min_foreground,
        rules=rules,
    )


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def table(name: str, rows: dict[str, dict]) -> str:
    head = (
        "| "
        + " | ".join(["rule", *(c[0] for c in COLUMNS), "n slices", "intensity AP_p", "map ratio"])
        + " |"
    )
    lines = [f"### {name}", "", head, "|" + "---|" * (len(COLUMNS) + 4)]
    for label, res in rows.items():
        cells = [_cell(res.get(k)) for _, k in COLUMNS]
        base = res.get(BASELINE_KEY, {}).get("ap_pixel")
        ratio = res["fidelity"]["map_ratio"]
        lines.append(
            f"| {label} | " + " | ".join([*cells, str(res["n_slices"]), _cell(base), _cell(ratio)]) + " |"
        )
    return "\n".join(lines)


def load_cases(args: argparse.Namespace) -> dict[str, list[Case]]:
    brats, mslub = SHARED / "brats2013", SHARED / "mslub"
    return {
        f"BraTS 2013 FLAIR, patients 0003-0005, {args.brats_slices} tumour slices each": [
            Case(p, brats / p / "Flair_subtrMeanDivStd.nii.gz", brats / p / "OTMultiClass.nii.gz",
                 brats / p / "brainmask.nii.gz", "lesion", args.brats_slices)
            for p in BRATS
        ],
        f"MSLUB FLAIR, patients 07 and 19, {args.mslub_slices} evenly spaced axial slices each": [
            Case(p, mslub / p / "FLAIR.nii.gz", mslub / p / "lesion_mask.nii.gz", None, "all",
                 args.mslub_slices)
            for p in MSLUB
        ],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/bench_eval_frame"))
    parser.add_argument("--brats-slices", type=int, default=8, help="tumour slices per BraTS patient")
    parser.add_argument("--mslub-slices", type=int, default=16, help="axial slices per MSLUB patient")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    ensemble = Ensemble.from_dir(resolve_ensemble("demo"))
    settings = RestoreSettings(device=args.device, seed=args.seed)
    device = resolve_device(args.device)
    models = [member.model(device) for member in ensemble.members]
    results: dict[str, dict] = {}
    texts = []
    for name, cases in load_cases(args).items():
        for case in cases:
            case.restore(ensemble, settings, models)
            n = case.restored["crop"].restored.size
            print(f"{case.name}: restored {n} slices ({time.perf_counter() - t0:.0f} s)", flush=True)
        rows = {label: score(cases, rules, size) for label, (rules, size) in ROWS.items()}
        results[name] = {
            label: {k: v for k, v in res.items() if k not in ("curves", "volumes")}
            for label, res in rows.items()
        }
        texts.append(table(name, rows))
        print(texts[-1], flush=True)
    seconds = round(time.perf_counter() - t0, 1)
    settings_used = {**settings.to_dict(), "ensemble": "demo", "command": " ".join(sys.argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {"settings": settings_used, "seconds": seconds, "results": results})
    write_text(args.out / "table.md", "\n\n".join(texts) + f"\n\n({seconds} s)\n")
    print(f"done in {seconds} s -> {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
