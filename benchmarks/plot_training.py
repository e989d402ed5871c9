"""Training curves against CPU-hours: validation AP and healthy-tissue fidelity of members.

Reads each member's ``log.csv`` (written by ``pseudohealthy train``; columns
:data:`pseudohealthy.training.config.LOG_FIELDS`) and plots, per member, the synthetic-anomaly
validation AP and the restoration's SSIM and PSNR outside the synthetic anomaly against
CPU-hours (logged wall time x ``--cores-per-run``: the share of a core each run had, for example
2/3 when three runs shared two cores; one value for all members, or one per member). Members
without fidelity columns (trained before they were logged) show AP only. Prints and writes a
table of each member's last validation row.

    .venv/bin/python benchmarks/plot_training.py runs/demo_v/fold_* sample_data/demo_ensemble/fold_* \\
        --labels v,v,v,eps,eps,eps --cores-per-run 0.667 --out results/training_curves

Writes ``training.md``, ``training.json`` and ``training.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Any

from pseudohealthy.data.files import write_json, write_text
from pseudohealthy.figures import save_figure

PANELS = (
    ("val_ap", "validation AP (synthetic)"),
    ("val_ssim_out", "SSIM healthy"),
    ("val_psnr_out", "PSNR healthy (dB)"),
)
"""The plotted columns of ``log.csv`` and their axis labels."""


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_curve(member: Path, cores: float) -> dict[str, list[float]]:
    """The validation rows of ``member/log.csv``: step, CPU-hours and each :data:`PANELS` column."""
    path = member / "log.csv"
    if not path.is_file():
        raise SystemExit(f"{member}: no log.csv")
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if not math.isnan(_number(r.get("val_ap")))]
    curve: dict[str, list[float]] = {"step": [_number(r["step"]) for r in rows]}
    curve["cpu_hours"] = [_number(r["time"]) * cores / 3600 for r in rows]
    for column, _ in PANELS:
        curve[column] = [_number(r.get(column)) for r in rows]
    return curve


def last_rows(curves: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """One row per member: its last validation's step, CPU-hours and :data:`PANELS` values."""
    rows = []
    for name, curve in curves.items():
        if not curve["step"]:
            continue
        rows.append({"member": name, **{key: values[-1] for key, values in curve.items()}})
    return rows


def _jsonable(value: Any) -> Any:
    """``value`` with NaN as None (strict JSON), through lists and dicts."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def _cell(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`last_rows`."""
    head = "| member | step | CPU-hours | val AP | SSIM healthy | PSNR healthy (dB) |\n" + "|---" * 6 + "|\n"
    body = "".join(
        f"| {r['member']} | {int(r['step'])} | {r['cpu_hours']:.2f} | {_cell(r['val_ap'], 3)} | "
        f"{_cell(r['val_ssim_out'], 3)} | {_cell(r['val_psnr_out'], 1)} |\n"
        for r in rows
    )
    return head + body


def plot(curves: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """One panel per :data:`PANELS` column against CPU-hours, one line per member."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(PANELS))
    for ax, (column, label) in zip(axes, PANELS, strict=True):
        for name, curve in curves.items():
            if not all(math.isnan(v) for v in curve[column]):
                ax.plot(curve["cpu_hours"], curve[column], marker="o", markersize=3, label=name)
        ax.set_xlabel("CPU-hours")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def _names(members: list[Path], labels: str | None) -> list[str]:
    tags = labels.split(",") if labels else [m.parent.name for m in members]
    if len(tags) != len(members):
        raise SystemExit(f"--labels gives {len(tags)} labels for {len(members)} members")
    return [f"{tag}/{m.name}" for tag, m in zip(tags, members, strict=True)]


def _cores(members: list[Path], text: str) -> list[float]:
    """``--cores-per-run``: one share for every member, or one per member; each positive."""
    try:
        shares = [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--cores-per-run: not a number in {text!r}") from None
    if len(shares) == 1:
        shares *= len(members)
    if len(shares) != len(members):
        raise SystemExit(f"--cores-per-run gives {len(shares)} shares for {len(members)} members")
    if not all(v > 0 for v in shares):
        raise SystemExit("--cores-per-run must be positive")
    return shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", nargs="+", type=Path, help="member folders (each with log.csv)")
    parser.add_argument("--labels", help="comma-separated label per member (default: parent folder)")
    parser.add_argument(
        "--cores-per-run", default="1", help="share of a core each run had (one, or one per member)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/training_curves"))
    args = parser.parse_args(argv)
    cores = _cores(args.members, args.cores_per_run)
    names = _names(args.members, args.labels)
    curves = {name: read_curve(m, c) for name, m, c in zip(names, args.members, cores, strict=True)}
    rows = last_rows(curves)
    text = table(rows)
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "training.md", text)
    record = {"cores_per_run": dict(zip(names, cores, strict=True)), "curves": curves, "last": rows}
    write_json(args.out / "training.json", _jsonable(record))
    print(f"wrote {plot(curves, args.out / 'training.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
