"""``benchmarks/gpu_check.py`` without CUDA: every CPU-reachable step rehearsed on the tiny preset,
the CUDA figures reported as not measured, and a failing step reported while the rest run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
NOT_MEASURED = "not measured (no CUDA device)"
CPU_STEPS = (
    "env",
    "ensemble",
    "restore_eager",
    "train_fp16",
    "train_bf16",
    "kill_resume",
    "ddp",
    "oom_restore",
    "oom_train",
)


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}  # never a GPU
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--fail-step", "equivalence"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert (out / "report.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), proc


def test_cpu_steps_pass_with_plausible_figures(report) -> None:
    got, _, proc = report
    steps = got["steps"]
    assert got["mode"] == "cpu" and got["finished"] and got["plan"]["restore_preset"] == "tiny"
    for name in CPU_STEPS:
        assert steps[name]["status"] == "passed", (name, steps[name].get("reason"), proc.stderr[-3000:])
        assert 0 < steps[name]["seconds"] <= steps[name]["budget_s"] + 10
    env = steps["env"]["figures"]
    assert env["cuda_available"] is False and env["gpu_count"] == 0 and env["torch"]
    assert _positive(env["matmul_fp32_cpu_tflops"]) and _positive(env["unet_gflop_per_pass"]["tiny"])
    restore = steps["restore_eager"]["figures"]
    assert (restore["preset"], restore["members"], restore["volume_slices"]) == ("tiny", 2, 155)
    default, ddpm = restore["default"], restore["ddpm50"]
    assert default["slices_done"] == 4 and default["extrapolated"] is True
    assert all(_positive(default[k]) for k in ("s_per_volume", "first_slice_s", "tflops"))
    assert _positive(restore["one_slice_s"]) and _positive(restore["warmup_s"])
    assert ddpm["s_per_volume"] > default["s_per_volume"]  # 50 steps against 10
    for name in ("train_fp16", "train_bf16"):
        train = steps[name]["figures"]
        assert _positive(train["steps_per_s"]) and train["steps"] >= 10
        assert train["loss_last_quarter"] < train["loss_first_quarter"]
        assert train["peak_gpu_mib"] == NOT_MEASURED
    assert steps["train_fp16"]["figures"]["grad_scaler"]["scale"] > 0
    assert steps["train_bf16"]["figures"]["grad_scaler"] == "disabled"
    resume = steps["kill_resume"]["figures"]
    assert resume["identical"] is True and resume["killed_at_step"] == 3
    ddp = steps["ddp"]["figures"]
    assert (ddp["backend"], ddp["world_size"], ddp["checkpoints"]) == ("gloo", 1, 2)  # --quick: 1 process
    assert "ok" in ddp["single_rank_group"]
    assert len(steps["oom_restore"]["figures"]["halvings"]) == 2
    assert steps["oom_restore"]["figures"]["max_abs_map_difference"] <= 1e-3
    assert "try --batch-size 2" in steps["oom_train"]["figures"]["error"]


def test_cuda_figures_are_not_measured(report) -> None:
    got, markdown, _ = report
    steps = got["steps"]
    assert steps["restore_compiled"]["status"] == NOT_MEASURED
    default = steps["restore_eager"]["figures"]["default"]
    assert default["peak_gpu_mib"] == NOT_MEASURED and default["fraction_of_peak"] == NOT_MEASURED
    assert steps["env"]["figures"]["matmul_bf16_tflops"] == NOT_MEASURED
    assert all(t["verdict"] == NOT_MEASURED for t in got["targets"])
    assert "the CUDA figures were not measured" in markdown
    table = markdown.split("## README table", 1)[1].split("##", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) > 10 and all(row.endswith(f"| {NOT_MEASURED} |") for row in rows)


def test_a_failing_step_is_reported_and_the_rest_run(report) -> None:
    got, markdown, proc = report
    failed = got["steps"]["equivalence"]
    assert failed["status"] == "failed" and "forced with --fail-step" in failed["reason"]
    assert "\n" not in failed["reason"] and "forced with --fail-step" in markdown
    order = list(got["steps"])
    assert order.index("equivalence") < order.index("oom_train")  # later steps ran and passed
    assert got["summary"]["failed"] == 1 and got["summary"]["passed"] == len(CPU_STEPS)
    assert proc.returncode == 1  # a failed step fails the command


def _table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_the_readme_table_is_the_one_the_report_fills(report) -> None:
    _, markdown, _ = report
    readme = (SCRIPT.parents[1] / "README.md").read_text(encoding="utf-8")
    gpu = readme.split("\n## GPU\n", 1)[1].split("\n## ", 1)[0]
    table = gpu[gpu.index("| figure | target | measured |") :]
    filled = markdown.split("## README table", 1)[1].split("##", 1)[0]
    assert [r[:2] for r in _table_rows(table)] == [r[:2] for r in _table_rows(filled)]
    assert all(r[2] == "not measured yet" for r in _table_rows(table))


def test_a_cuda_report_fills_the_table_and_explains_missed_targets(report) -> None:
    import copy

    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    got = copy.deepcopy(report[0])
    got["mode"], got["plan"]["restore_preset"] = "cuda", "paper"
    env = got["steps"]["env"]["figures"]
    env.update(
        gpus=[{"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8, "multiprocessors": 132}],
        gpu_count=1,
        driver="580.1",
        matmul_bf16_tflops=790.0,
        peak_tflops_datasheet=989.0,
        flops_by_stage={
            "paper": {
                "up_blocks.3": {"convolution": 52.1, "attention": 412.3, "linear": 6.4, "total": 470.8},
                "down_blocks.1": {"convolution": 18.4, "attention": 34.4, "linear": 4.3, "total": 57.1},
            }
        },
    )
    eager = got["steps"]["restore_eager"]["figures"]
    eager.update(members=10, steps=10, one_slice_s=0.6)
    eager["default"].update(s_per_volume=31.0, first_slice_s=4.2, tflops=300.0, peak_gpu_reserved_mib=6000.0)
    compiled = copy.deepcopy(got["steps"]["restore_eager"])
    compiled["figures"]["default"].update(s_per_volume=8.0, first_slice_s=0.9)
    got["steps"]["restore_compiled"] = compiled
    for name in ("train_fp16", "train_bf16"):
        got["steps"][name]["figures"].update(steps_per_s=6.5, peak_gpu_reserved_mib=30000.0)
    verdicts = {t["target"]: t for t in gpu_check.targets(got)}
    eager_target = verdicts["155 slices x 10 paper members, default sampler, eager"]
    assert eager_target["verdict"].startswith("missed by 3.10x") and "up_blocks.3" in eager_target["why"]
    assert "achieved 300 TFLOP/s" in eager_target["why"]
    assert verdicts["155 slices x 10 paper members, default sampler, compiled"]["verdict"] == "met"
    assert verdicts["slice on screen (first slice of the volume run)"]["verdict"] == "met"  # compiled: 0.9 s
    assert verdicts["paper preset memory, training fp16"]["verdict"].startswith("missed by 1.22x")
    got["targets"] = gpu_check.targets(got)
    table = _table_rows(gpu_check.readme_table(got))
    assert table[0][2].startswith("NVIDIA H200 (sm 9.0), driver 580.1")
    assert table[1][2] == "31 s" and table[2][2].startswith("8 s")
    assert table[7][2] == "6.5, 29.3 GiB"
    markdown = gpu_check.markdown(got)
    assert "**Device**: NVIDIA H200" in markdown and "| up_blocks.3 | 471 |" in markdown
