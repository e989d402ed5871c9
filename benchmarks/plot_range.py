"""Fidelity and detection of ensembles as the scans' intensity range moves (from ``evaluate``).

Reads the ``metrics.json`` that ``pseudohealthy evaluate`` wrote for each ensemble ("arm") on each
version of the same scans ("range": for example the dev volumes as distributed and clipped at 7
and at 5 z units) and plots, per arm, the restoration's healthy-brain PSNR, SSIM and bias and
the ensemble's AP_p against the range; prints and writes the same as a table.

    .venv/bin/python benchmarks/plot_range.py --ranges dev,clip7,clip5 \\
        --arm demo=runs/eval_{range}_demo --arm demo-sample=runs/eval_{range}_sample \\
        --out docs/results/range

``{range}`` in an arm's folder pattern is replaced by each range. Writes ``range.md``,
``range.json`` and ``range.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pseudohealthy.data.files import write_json, write_text
from pseudohealthy.figures import save_figure

COLUMNS = (
    ("psnr_healthy", "PSNR healthy (dB)", 1),
    ("ssim_healthy", "SSIM healthy", 3),
    ("bias_healthy", "bias healthy", 3),
    ("ap_pixel", "AP_p", 3),
)
"""(key, label, digits): fidelity keys are read from ``metrics["fidelity"]``, the others from the top."""


def read_point(folder: Path) -> dict[str, float | None]:
    """The :data:`COLUMNS` of one ``evaluate`` output folder (None where not recorded)."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run pseudohealthy evaluate -o {folder} first)")
    metrics = json.loads(path.read_text())
    fidelity = metrics.get("fidelity") or {}
    return {key: (fidelity if key in fidelity else metrics).get(key) for key, _, _ in COLUMNS}


def parse_arm(text: str) -> tuple[str, str]:
    """``LABEL=PATTERN`` -> (label, pattern with ``{range}``)."""
    label, sep, pattern = text.partition("=")
    if not sep or not label or "{range}" not in pattern:
        raise SystemExit(f"--arm {text!r}: expected LABEL=FOLDER_PATTERN with {{range}} in the pattern")
    return label, pattern


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(points: dict[str, dict[str, dict[str, float | None]]], ranges: list[str]) -> str:
    """One row per arm and range."""
    head = "| arm | range | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [head, "|---|---|" + "---|" * len(COLUMNS)]
    for arm, by_range in points.items():
        for name in ranges:
            cells = " | ".join(_cell(by_range[name][key], digits) for key, _, digits in COLUMNS)
            lines.append(f"| {arm} | {name} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(points: dict[str, dict[str, dict[str, float | None]]], ranges: list[str], path: Path) -> Path:
    """One panel per column, one line per arm, the ranges on the x axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(COLUMNS), 3.6))
    axes = fig.subplots(1, len(COLUMNS))
    x = list(range(len(ranges)))
    for arm, by_range in points.items():
        for ax, (key, _, _) in zip(axes, COLUMNS, strict=True):
            y = [by_range[name][key] for name in ranges]
            ax.plot(x, [float("nan") if v is None else v for v in y], marker="o", label=arm)
    for ax, (_, label, _) in zip(axes, COLUMNS, strict=True):
        ax.set_xticks(x, ranges)
        ax.set_xlabel("intensity range of the scans")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranges", required=True, help="comma-separated range names, in plot order")
    parser.add_argument("--arm", action="append", required=True, help="LABEL=FOLDER_PATTERN with {range}")
    parser.add_argument("--out", type=Path, default=Path("results/range"))
    args = parser.parse_args(argv)
    ranges = [r for r in args.ranges.split(",") if r]
    arms = [parse_arm(a) for a in args.arm]
    points: dict[str, dict[str, dict[str, Any]]] = {
        label: {name: read_point(Path(pattern.format(range=name))) for name in ranges}
        for label, pattern in arms
    }
    text = table(points, ranges)
    print(text, end="")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "range.md", text)
    write_json(args.out / "range.json", {"ranges": ranges, "arms": dict(arms), "points": points})
    print(f"wrote {plot(points, ranges, args.out / 'range.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
