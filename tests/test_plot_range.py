"""``benchmarks/plot_range.py``: each arm's evaluate output per intensity range, read back as
table rows and a figure; a missing output or a pattern without ``{range}`` stops it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_modules import load_benchmark


def _metrics(folder: Path, psnr: float, ap: float, bias: float | None) -> None:
    folder.mkdir(parents=True)
    fidelity = {"ssim_healthy": 0.9, "psnr_healthy": psnr, "map_ratio": 3.0}
    if bias is not None:  # evaluate outputs written before bias_healthy existed lack it
        fidelity["bias_healthy"] = bias
    (folder / "metrics.json").write_text(json.dumps({"ap_pixel": ap, "auroc": 0.5, "fidelity": fidelity}))


def test_rows_per_arm_and_range(tmp_path: Path, capsys) -> None:
    bench = load_benchmark("plot_range")
    for arm, base in (("a", 30.0), ("b", 20.0)):
        for k, name in enumerate(("dev", "clip5")):
            _metrics(
                tmp_path / f"eval_{name}_{arm}",
                base - 3 * k,
                0.5 + 0.1 * k,
                None if arm == "b" else -0.01 * k,
            )
    out = tmp_path / "out"
    pattern = str(tmp_path / "eval_{range}_")
    assert (
        bench.main(
            ["--ranges", "dev,clip5", "--arm", f"A={pattern}a", "--arm", f"B={pattern}b", "--out", str(out)]
        )
        == 0
    )
    text = (out / "range.md").read_text()
    assert "| A | clip5 | 27.0 | 0.900 | -0.010 | 0.600 |" in text
    assert "| B | dev | 20.0 | 0.900 | - | 0.500 |" in text
    assert text in capsys.readouterr().out
    record = json.loads((out / "range.json").read_text())
    assert record["points"]["B"]["clip5"]["psnr_healthy"] == 17.0
    assert (out / "range.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="not found"):
        bench.main(["--ranges", "dev,clip7", "--arm", f"A={pattern}a", "--out", str(out)])
    with pytest.raises(SystemExit, match="range"):
        bench.main(["--ranges", "dev", "--arm", f"A={tmp_path}", "--out", str(out)])
