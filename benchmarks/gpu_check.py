"""One command that proves the GPU path: every CUDA code path exercised and measured in one short slot.

Run: ``.venv/bin/python benchmarks/gpu_check.py [--out results/gpu_check] [--budget-s 420] [--quick]``
(on a GPU machine: ``bash scripts/gpu_check.sh``, which also picks a Python whose torch sees CUDA).

Steps, each in a process of its own under its share of ``--budget-s`` (a step that overruns
is killed and keeps what it measured; a failure is reported in one line and the next step
runs): ``env`` (versions, GPUs, a measured bf16 matmul rate, UNet FLOPs per stage),
``ensemble`` (random-weight members written), ``restore_eager`` (a 155-slice synthetic volume
with the 10-member ``paper`` ensemble at the default sampler and at DDPM 50, extrapolated where
the budget demands: s/volume, slice on screen, peak GPU memory, TFLOP/s against the peak),
``equivalence`` (engine vs the naive loop in float32; fp16/bf16 vs float32), ``train_fp16`` and
``train_bf16`` (the ``paper`` preset on the sample scan's slices: steps/s, peak memory, the loss
finite and falling), ``kill_resume``, ``ddp`` (torchrun, NCCL), ``oom_restore`` and ``oom_train``
(under ``torch.cuda.set_per_process_memory_fraction``) and ``restore_compiled`` (``--compile
reduce-overhead``; last, as the riskiest). ``report.json`` and ``report.md`` in ``--out`` are
rewritten after every step; the Markdown report ends with the README's GPU table filled in.

Without CUDA the same command rehearses every step but ``restore_compiled`` on the ``tiny``
preset (restoring on ``cpu`` unless ``--quick``), with out-of-memory errors simulated, and says
that the CUDA figures were not measured. ``--fail-step NAME`` makes a step fail (a test hook);
``--only A,B`` runs some steps (``env`` always runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gpu_steps import NOT_MEASURED, STEPS, Plan, clean, ready, run_step, run_worker
from pseudohealthy.data.files import write_json, write_text
from pseudohealthy.engine.defaults import DEFAULT_SAMPLER, DEFAULT_STEPS

# name, what it does, share of the budget, CUDA only
STEP_TABLE: tuple[tuple[str, str, float, bool], ...] = (
    ("env", "device, versions, bf16 matmul rate, FLOPs per stage", 3, False),
    ("ensemble", "random-weight ensembles written", 6, False),
    ("restore_eager", "restore 155 slices, default sampler and DDPM 50, eager", 17, False),
    ("equivalence", "engine vs naive loop (fp32); fp16/bf16 vs fp32", 6, False),
    ("train_fp16", "training, AMP fp16 + GradScaler", 9, False),
    ("train_bf16", "training, AMP bf16", 7, False),
    ("kill_resume", "training killed and resumed", 9, False),
    ("ddp", "torchrun DDP (NCCL on CUDA, gloo on the CPU)", 8, False),
    ("oom_restore", "restore under a memory limit: the batch halves", 6, False),
    ("oom_train", "training under a memory limit: one-line error", 7, False),
    ("restore_compiled", "restore with --compile reduce-overhead", 22, True),
)
assert [s[0] for s in STEP_TABLE] == list(STEPS)
MIN_STEP_S = 5.0
ENV_MIN_S = 30.0
GRACE_S = 10.0
TARGET_VOLUME_S, TARGET_SCREEN_S, TARGET_MEMORY_GIB = 10.0, 1.0, 24.0
PRELOAD = [  # what every step imports, once (torch._dynamo: the optimisers import it)
    "torch",
    "torch._dynamo",
    "torch.distributed",
    "numpy",
    "skimage.color",
    "skimage.data",
    "skimage.io",
    "skimage.transform",
    "_gpu",
    "_gpu_steps",
    "pseudohealthy.engine.restore",
    "pseudohealthy.engine.reference",
    "pseudohealthy.training.loop",
    "pseudohealthy.data.dataset",
]


def _context(method: str = "forkserver") -> Any:
    """Processes forked from a server that imported torch and the package once and never
    touches CUDA (its checks of CUDA go through NVML, which is fork-safe); ``spawn`` elsewhere."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    if method == "forkserver" and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _kill_group(pid: int | None) -> None:
    """End the step's process group (its torchrun, compile workers and the like)."""
    if pid:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)


def run_child(ctx: Any, name: str, plan: Plan, budget: float) -> dict[str, Any]:
    """Run one step in its own process under ``budget`` seconds (+ grace); its record."""
    path = Path(plan.work) / f"step_{name}.json"
    path.unlink(missing_ok=True)
    deadline = time.time() + budget
    proc = ctx.Process(target=run_step, args=(name, plan, str(path), deadline), name=f"gpu_check:{name}")
    t0 = time.perf_counter()
    proc.start()
    try:
        proc.join(timeout=budget + GRACE_S)
        timed_out = proc.is_alive()
    finally:
        _kill_group(proc.pid)
        proc.join(10)
    seconds = time.perf_counter() - t0
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {"name": name, "figures": {}, "checks": [], "notes": []}
    if timed_out:
        record["status"] = "timed out"
        record["reason"] = (
            f"killed after {budget + GRACE_S:.0f} s (budget {budget:.0f} s); the figures so far are kept"
        )
    elif record.get("status") in (None, "running"):
        record["status"] = "failed"
        what = f"exit code {proc.exitcode}"
        if proc.exitcode is not None and proc.exitcode < 0:
            with contextlib.suppress(ValueError):
                what = f"signal {signal.Signals(-proc.exitcode).name}"
        record["reason"] = f"the step's process ended with {what} before reporting"
    record.update(seconds=seconds, budget_s=budget)
    return record


# --------------------------------------------------------------------------- report


def _get(report: dict[str, Any], step: str, *keys: str) -> Any:
    """A figure of a passed, failed or timed-out step (None when absent)."""
    value: Any = report["steps"].get(step, {}).get("figures", {})
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if _num(value):
        return f"{value:.{digits}g}{unit}"
    return str(value)


def _dominates(report: dict[str, Any], step: str, preset: str) -> str:
    """Where a volume's FLOPs go, the FLOP-bound time at the measured matmul rate, and the rate
    ``step`` achieved: what a missed speed target is made of."""
    stages = _get(report, "env", "flops_by_stage", preset) or {}
    members, steps = _get(report, step, "members") or 10, _get(report, step, "steps") or 10
    if not stages:
        return ""
    total = sum(s["total"] for s in stages.values())
    volume_flop = total * 1e9 * members * steps * 155
    top, st = max(stages.items(), key=lambda kv: kv[1]["total"])
    text = (
        f"{volume_flop:.2e} FLOP per volume; {top} takes {100 * st['total'] / total:.0f}% of a pass "
        f"({100 * st['attention'] / total:.0f}% in its self-attention)"
    )
    rate, got = _get(report, "env", "matmul_bf16_tflops"), _get(report, step, "default", "tflops")
    if _num(rate):
        floor = volume_flop / (rate * 1e12)
        text += (
            f"; at the measured {rate:.0f} TFLOP/s bf16 matmul rate a volume needs {floor:.1f} s "
            f"(<= {max(1, int(steps * TARGET_VOLUME_S / floor))} steps fit in {TARGET_VOLUME_S:.0f} s)"
        )
        if _num(got):
            text += f"; achieved {got:.0f} TFLOP/s ({100 * got / rate:.0f}% of that rate)"
    return text


def _target(name: str, limit: str, value: float | None, bound: float, unit: str, why: str = "") -> dict:
    if value is None:
        return {"target": name, "limit": limit, "measured": None, "verdict": "not measured"}
    met = value <= bound
    verdict = "met" if met else f"missed by {value / bound:.2f}x ({value - bound:.3g}{unit} over)"
    return {
        "target": name,
        "limit": limit,
        "measured": f"{value:.3g}{unit}",
        "verdict": verdict,
        "why": "" if met else why,
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's GPU targets against the measured figures, with what dominates where missed."""
    if report.get("mode") != "cuda":
        names = ("155 slices x 10 paper members, default sampler", "slice on screen", "paper preset memory")
        return [{"target": n, "limit": "", "measured": None, "verdict": NOT_MEASURED} for n in names]
    out = []
    for step, label in (("restore_eager", "eager"), ("restore_compiled", "compiled")):
        value = _get(report, step, "default", "s_per_volume")
        why = _dominates(report, step, "paper")
        name = f"155 slices x 10 paper members, default sampler, {label}"
        out.append(_target(name, "<= 10 s", value, TARGET_VOLUME_S, " s", why))
    screens = [_get(report, s, "default", "first_slice_s") for s in ("restore_eager", "restore_compiled")]
    screens = [v for v in screens if _num(v)]
    one = [_get(report, s, "one_slice_s") for s in ("restore_eager", "restore_compiled")]
    one = [v for v in one if _num(v)]
    out.append(
        _target(
            "slice on screen (first slice of the volume run)",
            "<= 1 s",
            min(screens) if screens else None,
            TARGET_SCREEN_S,
            " s",
            f"the first result waits for its whole batch; one slice alone took {min(one):.3g} s"
            if one
            else "",
        )
    )
    mems = {
        "restore (10 members)": _get(report, "restore_eager", "default", "peak_gpu_reserved_mib"),
        "training fp16": _get(report, "train_fp16", "peak_gpu_reserved_mib"),
        "training bf16": _get(report, "train_bf16", "peak_gpu_reserved_mib"),
    }
    for what, mib in mems.items():
        gib = mib / 1024 if _num(mib) else None
        out.append(
            _target(
                f"paper preset memory, {what}", "<= 24 GiB", gib, TARGET_MEMORY_GIB, " GiB", "peak reserved"
            )
        )
    return out


README_ROWS = (
    ("device, driver, torch / CUDA", "-"),
    (
        f"155 slices x 10 `paper` members, default sampler ({DEFAULT_SAMPLER.upper()} "
        f"{DEFAULT_STEPS[DEFAULT_SAMPLER]}), eager",
        "<= 10 s",
    ),
    ("the same, `--compile reduce-overhead` (compiling took)", "<= 10 s"),
    ("155 slices, DDPM 50 (extrapolated): eager / compiled", "-"),
    ("slice on screen: first result of a volume run / one slice alone", "<= 1 s"),
    ("peak GPU memory restoring with 10 members (reserved)", "<= 24 GiB"),
    ("achieved TFLOP/s restoring (fraction of the datasheet bf16 peak)", "-"),
    ("training `paper` fp16 + GradScaler: steps/s (batch 16), peak memory", "<= 24 GiB"),
    ("training `paper` bf16: steps/s (batch 16), peak memory", "<= 24 GiB"),
    ("kill and resume (fp16)", "state identical"),
    ("DDP with NCCL on all visible GPUs", "identical weights"),
    ("out of memory: restore / training", "halves, same maps / one-line error"),
    ("engine vs naive loop (fp32); fp16 / bf16 vs fp32", "tolerances in the report"),
)


def _readme_values(report: dict[str, Any]) -> list[str]:
    """The measured column of :data:`README_ROWS`."""
    env = report["steps"].get("env", {}).get("figures", {})
    gpu = (env.get("gpus") or [{}])[0]
    e, c = "restore_eager", "restore_compiled"

    def v(step: str, *keys: str, unit: str = "", digits: int = 3) -> str:
        return _fmt(_get(report, step, *keys), unit, digits)

    def gib(step: str, *keys: str) -> str:
        mib = _get(report, step, *keys)
        return f"{mib / 1024:.1f} GiB" if _num(mib) else "-"

    def status(step: str, text: str) -> str:
        got = report["steps"].get(step, {}).get("status")
        return text if got == "passed" else f"{got or 'not run'}: {text}"

    s = " s"
    return [
        f"{gpu.get('name')} (sm {gpu.get('capability')}), driver {env.get('driver')}, "
        f"torch {env.get('torch')} / CUDA {env.get('torch_cuda_build')}",
        status(e, v(e, "default", "s_per_volume", unit=s)),
        status(c, f"{v(c, 'default', 's_per_volume', unit=s)} ({v(c, 'warmup_s', unit=s)})"),
        f"{v(e, 'ddpm50', 's_per_volume', unit=s)} / {v(c, 'ddpm50', 's_per_volume', unit=s)}",
        f"{v(e, 'default', 'first_slice_s', unit=s)} / {v(e, 'one_slice_s', unit=s)} (compiled "
        f"{v(c, 'default', 'first_slice_s', unit=s)} / {v(c, 'one_slice_s', unit=s)})",
        gib(e, "default", "peak_gpu_reserved_mib"),
        f"{v(e, 'default', 'tflops')} ({v(e, 'default', 'fraction_of_peak', digits=2)}); "
        f"compiled {v(c, 'default', 'tflops')}",
        *[
            status(t, f"{v(t, 'steps_per_s')}, {gib(t, 'peak_gpu_reserved_mib')}")
            for t in ("train_fp16", "train_bf16")
        ],
        status(
            "kill_resume",
            f"bitwise {v('kill_resume', 'identical')}, "
            f"largest difference {v('kill_resume', 'max_abs_difference')}",
        ),
        status("ddp", f"{v('ddp', 'backend')}, {v('ddp', 'world_size')} rank(s)"),
        f"{report['steps'].get('oom_restore', {}).get('status', 'not run')} / "
        f"{report['steps'].get('oom_train', {}).get('status', 'not run')}",
        status(
            "equivalence",
            f"{v('equivalence', 'engine_vs_naive_fp32_max_abs')}; "
            f"{v('equivalence', 'fp16_vs_fp32', 'mean_abs')} / "
            f"{v('equivalence', 'bf16_vs_fp32', 'mean_abs')}",
        ),
    ]


def readme_table(report: dict[str, Any]) -> str:
    """README's GPU table with the measured column filled (every cell NOT_MEASURED without CUDA)."""
    values = _readme_values(report) if report.get("mode") == "cuda" else [NOT_MEASURED] * len(README_ROWS)
    lines = ["| figure | target | measured |", "|---|---|---|"]
    lines += [
        f"| {row} | {target} | {value} |" for (row, target), value in zip(README_ROWS, values, strict=True)
    ]
    return "\n".join(lines)


def _flat(figures: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in figures.items():
        if key == "flops_by_stage":
            continue
        if isinstance(value, dict):
            out += _flat(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}: {_fmt(value, digits=4) if _num(value) else value}")
    return out


def _headline(report: dict[str, Any]) -> str:
    env = report["steps"].get("env", {}).get("figures", {})
    if report.get("mode") == "cuda":
        g = (env.get("gpus") or [{}])[0]
        return (
            f"**Device**: {g.get('name')} x {env.get('gpu_count')} (capability {g.get('capability')}, "
            f"{g.get('memory_gib')} GiB, {g.get('multiprocessors')} SMs), driver {env.get('driver')}, torch "
            f"{env.get('torch')} (CUDA {env.get('torch_cuda_build')}, cuDNN {env.get('cudnn')}, "
            f"NCCL {env.get('nccl')}); "
            f"bf16 matmul measured {_fmt(env.get('matmul_bf16_tflops'), ' TFLOP/s')}, datasheet "
            f"{_fmt(env.get('peak_tflops_datasheet'), ' TFLOP/s')}."
        )
    why = "; ".join(report["steps"].get("env", {}).get("notes", [])) or "CUDA not available"
    return (
        f"**No CUDA device** ({why}): the CUDA figures were not measured. The CPU-reachable steps ran as a "
        f"rehearsal on the `{report.get('plan', {}).get('restore_preset', 'tiny')}` preset (training "
        f"`{report.get('plan', {}).get('train_preset', 'tiny')}`); the out-of-memory steps simulate "
        "the error."
    )


def _stage_table(report: dict[str, Any]) -> list[str]:
    """GFLOP of one UNet pass per stage of the restored preset: where the time can go."""
    preset = report.get("plan", {}).get("restore_preset")
    stages = _get(report, "env", "flops_by_stage", preset) if preset else None
    if not stages:
        return []
    total = sum(st["total"] for st in stages.values()) or 1.0
    lines = [
        "",
        f"## FLOPs of one `{preset}` pass by stage",
        "",
        "| stage | GFLOP | convolution | attention | linear | share |",
        "|---|---|---|---|---|---|",
    ]
    for name, st in stages.items():
        cells = " | ".join(f"{st[k]:.3g}" for k in ("total", "convolution", "attention", "linear"))
        lines.append(f"| {name} | {cells} | {100 * st['total'] / total:.1f}% |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """The one-page report: headline, steps, targets, README table, then every figure."""
    lines = [
        "# GPU check",
        "",
        f"{report['started']}, {report.get('elapsed_s', 0):.0f} s of a {report['budget_s']:.0f} s budget"
        f"{'' if report.get('finished') else ' (running)'}; `{report['command']}`",
        "",
        _headline(report),
        "",
        "| step | status | seconds | reason |",
        "|---|---|---|---|",
    ]
    for name, title, _, _ in STEP_TABLE:
        s = report["steps"].get(name, {})
        secs = f"{s['seconds']:.1f} / {s['budget_s']:.0f}" if _num(s.get("seconds")) else "-"
        lines.append(f"| `{name}`: {title} | {s.get('status', 'pending')} | {secs} | {s.get('reason', '')} |")
    lines += ["", "## Targets", "", "| target | limit | measured | verdict |", "|---|---|---|---|"]
    for t in report.get("targets", []):
        verdict = t["verdict"] + (f": {t['why']}" if t.get("why") else "")
        lines.append(f"| {t['target']} | {t['limit']} | {_fmt(t['measured'])} | {verdict} |")
    lines += ["", "## README table", "", readme_table(report), *_stage_table(report), "", "## Figures"]
    for name, *_ in STEP_TABLE:
        s = report["steps"].get(name)
        if not s or (not s.get("figures") and not s.get("checks")):
            continue
        lines += ["", f"### `{name}` ({s.get('status')})", ""]
        lines += [
            f"- {c['check']}: {'ok' if c['ok'] else 'FAILED'} ({c['detail']})" for c in s.get("checks", [])
        ]
        lines += [f"- note: {n}" for n in s.get("notes", [])]
        lines += [f"- {f}" for f in _flat(s.get("figures", {}))]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    """``report.json`` and ``report.md`` in ``out``, each written atomically."""
    report["elapsed_s"] = time.time() - report["t0"]
    report["targets"] = targets(report)
    report["summary"] = {
        status: sum(1 for s in report["steps"].values() if s.get("status") == status)
        for status in ("passed", "failed", "timed out", "skipped", NOT_MEASURED)
    }
    write_json(out / "report.json", clean(report))
    write_text(out / "report.md", markdown(report))


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu_check"), help="report folder")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for all steps (default 420)")
    parser.add_argument("--quick", action="store_true", help="without CUDA: the tiny preset everywhere")
    parser.add_argument("--only", help="comma-separated steps to run (env always runs)")
    parser.add_argument("--fail-step", help="make this step fail (a test hook)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a training process of the kill/DDP steps
    return parser


def _budget(remaining: float, pending: list[str]) -> float:
    """The next step's share of the seconds left (``env``: at least ``ENV_MIN_S``, it sets the mode)."""
    share = {name: s for name, _, s, _ in STEP_TABLE}
    budget = remaining * share[pending[0]] / sum(share[n] for n in pending)
    return max(budget, ENV_MIN_S) if pending[0] == "env" else budget


def _plan(env: dict[str, Any], args: argparse.Namespace, work: str) -> Plan:
    figures = env.get("figures", {})
    cuda = bool(figures.get("cuda_available"))
    n_gpus = int(figures.get("gpu_count") or 0)
    return Plan.for_mode(
        cuda, args.quick, n_gpus, work, str(Path(__file__).resolve()), fail_step=args.fail_step
    )


def _announce(i: int, n: int, name: str, record: dict[str, Any]) -> None:
    reason = f": {record['reason']}" if record.get("reason") else ""
    secs = f" in {record['seconds']:.1f} s" if _num(record.get("seconds")) else ""
    print(f"[{i}/{n}] {name}: {record['status']}{secs}{reason}", flush=True)


def _start_server(ctx: Any, report: dict[str, Any]) -> None:
    """Start the process server (torch and the package imported once), timed."""
    t0 = time.perf_counter()
    starter = ctx.Process(target=ready)
    starter.start()
    starter.join()
    report["preload_s"] = time.perf_counter() - t0
    print(f"process server started in {report['preload_s']:.1f} s", flush=True)


def _steps_to_run(args: argparse.Namespace) -> set[str]:
    names = [n for n, *_ in STEP_TABLE]
    only = set(args.only.split(",")) | {"env"} if args.only else set(names)
    unknown = only - set(names)
    if unknown:
        raise SystemExit(
            f"gpu_check: unknown step(s) {', '.join(sorted(unknown))} (steps: {', '.join(names)})"
        )
    return only


def run_all(args: argparse.Namespace, report: dict[str, Any], work: str) -> None:
    """Every step in order, the report rewritten after each."""
    ctx = _context()
    names, only = [n for n, *_ in STEP_TABLE], _steps_to_run(args)
    plan = Plan.for_mode(False, args.quick, 0, work, str(Path(__file__).resolve()), fail_step=args.fail_step)
    _start_server(ctx, report)
    t_end = report["t0"] + args.budget_s
    for i, (name, _, _, cuda_only) in enumerate(STEP_TABLE, 1):
        pending = [n for n in names[i - 1 :] if n in only]
        if name not in only:
            record: dict[str, Any] = {"status": "skipped", "reason": "not in --only"}
        elif cuda_only and not plan.cuda:
            record = {"status": NOT_MEASURED, "reason": "CUDA only"}
        elif (budget := _budget(t_end - time.time(), pending)) < MIN_STEP_S:
            record = {"status": "skipped", "reason": f"out of time ({budget:.0f} s left of the budget)"}
        else:
            report["steps"][name] = {"status": "running", "budget_s": budget}
            write_report(args.out, report)
            print(f"[{i}/{len(names)}] {name}: running (budget {budget:.0f} s)", flush=True)
            record = run_child(ctx, name, plan, budget)
            if name == "env" and "fork" in record.get("reason", ""):  # CUDA refused the forked process
                print(f"env: {record['reason']}; steps start as fresh processes instead", flush=True)
                ctx = _context("spawn")
                record = run_child(ctx, name, plan, budget)
                record["notes"] = [*record.get("notes", []), "forked processes could not use CUDA: spawned"]
        report["steps"][name] = record
        if name == "env":
            plan = _plan(record, args, work)
            report["mode"], report["plan"] = ("cuda" if plan.cuda else "cpu"), plan.__dict__
            seen = f"available: {plan.n_gpus} GPU(s)" if plan.cuda else f"not available: {NOT_MEASURED}"
            print(f"CUDA {seen}", flush=True)
        write_report(args.out, report)
        _announce(i, len(names), name, record)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "t0": time.time(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "budget_s": args.budget_s,
        "mode": "pending",
        "steps": {},
        "finished": False,
    }
    work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        run_all(args, report, work)
    except KeyboardInterrupt:
        print("gpu_check: interrupted; the report holds the steps done", file=sys.stderr)
    finally:
        report["finished"] = True
        write_report(args.out, report)
        shutil.rmtree(work, ignore_errors=True)
    print(f"report: {args.out / 'report.md'}", flush=True)
    print(readme_table(report))
    failed = [n for n, s in report["steps"].items() if s.get("status") in ("failed", "timed out")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
