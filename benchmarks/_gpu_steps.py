"""The steps of ``gpu_check.py``, each run in a process of its own (see :func:`run_step`).

A step receives the run's :class:`Plan` (the mode and the sizes of the work) and a
:class:`Record` that it fills with figures, checks and notes; the record is written to the
step's result file after every entry, so a step killed at its deadline keeps what it measured.
Every step also runs without CUDA, on the ``tiny``/``cpu`` presets, except ``restore_compiled``
(CUDA only); the out-of-memory steps then simulate the out-of-memory error, and figures that need
a GPU read :data:`NOT_MEASURED`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _gpu import device_peak_tflops, matmul_tflops, unet_flops, unet_flops_by_stage, versions

NOT_MEASURED = "not measured (no CUDA device)"
VOLUME_SLICES = 155  # a BraTS volume's axial slices

# stated tolerances of the equivalence checks (largest or mean |difference| of the anomaly maps)
TOL_NAIVE_CPU = 1e-4  # engine vs naive loop, float32 on the CPU (tests/test_restore_equivalence.py)
TOL_NAIVE_CUDA = 1e-3  # the same on CUDA with TF32 off (other kernels per batch size)
TOL_HALF = {"fp16": 0.01, "bf16": 0.02}  # mean |map difference| and |score difference| vs float32
TOL_RESUME_CUDA = 1e-4  # largest |difference| of the resumed state on CUDA (CPU: bitwise)
TOL_OOM_MAPS = 1e-3  # maps after halving vs the unlimited run (float32)

log = logging.getLogger("gpu_check")


@dataclass
class Plan:
    """The mode of a run and the sizes of every step's work (JSON-ready)."""

    cuda: bool
    device: str
    quick: bool
    work: str
    script: str
    n_gpus: int = 0
    fail_step: str | None = None
    restore_preset: str = "tiny"
    restore_members: int = 2
    restore_slices: int | None = 4  # None: the whole volume, stopped at the deadline
    ddpm_slices: int = 2
    equiv_preset: str = "tiny"
    equiv_members: int = 2
    equiv_slices: int = 3
    train_preset: str = "tiny"
    train_batch: int = 4
    train_steps: int = 20
    train_calibration: int = 3
    train_log_every: int = 1
    train_lr: float = 1e-3
    train_workers: int = 0
    small_preset: str = "tiny"  # kill-and-resume, DDP and the out-of-memory steps
    small_batch: int = 4
    resume_every: int = 3
    ddp_ranks: int = 2
    ddp_steps: int = 3

    @classmethod
    def for_mode(cls, cuda: bool, quick: bool, n_gpus: int, work: str, script: str, **kw: Any) -> Plan:
        """The plan of a CUDA run (the ``paper`` preset) or a CPU rehearsal (``tiny``; ``cpu``
        for restoration unless ``quick``)."""
        if cuda:
            workers = max(0, min(8, (os.cpu_count() or 1) - 1))
            values: dict[str, Any] = dict(
                restore_preset="paper",
                restore_members=10,
                restore_slices=None,
                ddpm_slices=32,
                equiv_preset="paper",
                equiv_members=2,
                equiv_slices=4,
                train_preset="paper",
                train_batch=16,
                train_steps=300,
                train_calibration=10,
                train_log_every=5,
                train_lr=1e-4,
                train_workers=workers,
                small_preset="paper",
                small_batch=8,
                resume_every=5,
                ddp_ranks=max(1, n_gpus),
                ddp_steps=4,
            )
        elif quick:  # one torchrun process (gloo opened by the check): the test's budget on 2 cores
            values = dict(train_steps=12, train_calibration=2, ddp_ranks=1)
        else:
            values = dict(restore_preset="cpu", train_steps=30)  # fp16 autocast on a CPU: tiny only
        device = "cuda" if cuda else "cpu"
        return cls(
            cuda=cuda, device=device, quick=quick, work=work, script=script, n_gpus=n_gpus, **values, **kw
        )


class Record:
    """What a step measured: ``figures``, ``checks`` and ``notes``, written to ``path`` at once."""

    def __init__(self, name: str, path: Path, deadline: float) -> None:
        self.path, self.deadline = path, deadline
        self.data: dict[str, Any] = {
            "name": name,
            "status": "running",
            "figures": {},
            "checks": [],
            "notes": [],
        }

    def fig(self, **values: Any) -> None:
        self.data["figures"].update(values)
        self.flush()

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.data["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        self.flush()
        return bool(ok)

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.flush()

    def left(self) -> float:
        """Seconds until the step's deadline."""
        return self.deadline - time.time()

    def flush(self) -> None:
        from pseudohealthy.data.files import write_json

        write_json(self.path, clean(self.data))


def clean(value: Any) -> Any:
    """``value`` made JSON-safe: numpy scalars to Python, non-finite floats to None, rounded."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    return value


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (at most 240 characters)."""
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"[:240]


def ready() -> None:
    """Nothing: the first process started starts the process server (its imports are timed)."""


def run_step(name: str, plan: Plan, result_path: str, deadline: float) -> None:
    """Run step ``name`` in this (child) process and write its record to ``result_path``."""
    with contextlib.suppress(OSError):
        os.setsid()  # a process group of its own: the parent ends the step's subprocesses with it
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(name)s: %(message)s")
    if not plan.cuda:
        torch.set_num_threads(1)  # small shared CPUs: one thread gives steady timings
    record = Record(name, Path(result_path), deadline)
    try:
        if plan.fail_step == name:
            raise RuntimeError("failure forced with --fail-step (test hook)")
        STEPS[name](record, plan)
        failed = [c for c in record.data["checks"] if not c["ok"]]
        record.data["status"] = "failed" if failed else "passed"
        if failed:
            record.data["reason"] = "; ".join(f"{c['check']}: {c['detail']}" for c in failed)[:300]
    except BaseException as exc:  # reported, never raised: the next step runs regardless
        record.data["status"] = "failed"
        record.data["reason"] = one_line(exc)
        record.data["traceback"] = traceback.format_exc().splitlines()[-12:]
        traceback.print_exc()
    record.flush()
    sys.stdout.flush()
    sys.stderr.flush()


# --------------------------------------------------------------------------- shared helpers


def _device(spec: str) -> torch.device:
    """The device of ``spec`` with its index (``cuda:0``): the memory-limit calls need one."""
    from pseudohealthy.device import resolve_device

    return resolve_device(spec)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> dict[str, Any]:
    """Peak GPU memory since the last reset, allocated and reserved (MiB)."""
    if device.type != "cuda":
        return {"peak_gpu_mib": NOT_MEASURED, "peak_gpu_reserved_mib": NOT_MEASURED}
    torch.cuda.synchronize(device)
    return {
        "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20,
        "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
    }


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """TF32 off for convolutions and matrix products (restored afterwards)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _deterministic() -> None:
    """Deterministic kernels where torch has them (warnings elsewhere); call before CUDA starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def ensure_ensemble(plan: Plan, preset: str, n_members: int) -> Any:
    """The first ``n_members`` of a random-weight ensemble of ``preset`` in the run's scratch
    folder (written on first use with :func:`pseudohealthy.engine.reference.random_ensemble`)."""
    from pseudohealthy.engine.reference import random_ensemble
    from pseudohealthy.model.checkpoint import Ensemble

    for marker in sorted(Path(plan.work).glob(f"ensemble_{preset}_*/complete.json")):
        if json.loads(marker.read_text())["members"] >= n_members:
            return Ensemble.from_dir(marker.parent).select(range(n_members))
    folder = Path(plan.work) / f"ensemble_{preset}_{n_members}"
    random_ensemble(folder, preset, n_members)
    (folder / "complete.json").write_text(json.dumps({"members": n_members}))
    return Ensemble.from_dir(folder)


def synthetic_volume(n_slices: int = VOLUME_SLICES) -> Any:
    """The bundled sample scan's foreground slices resampled (linearly, along z) to ``n_slices``
    axial slices: a BraTS-sized volume whose every slice is foreground."""
    from pseudohealthy.data.io import load_scan, volume_from_array
    from pseudohealthy.data.preprocess import prepare_scan
    from pseudohealthy.data.sample import sample_scan_path

    scan = load_scan(sample_scan_path())
    fg = prepare_scan(scan, size=32).indices
    z = np.linspace(fg.min(), fg.max(), n_slices)
    lo = np.floor(z).astype(int)
    hi = np.minimum(lo + 1, scan.data.shape[2] - 1)
    w = (z - lo).astype(np.float32)
    data = scan.data[:, :, lo] * (1 - w) + scan.data[:, :, hi] * w
    return volume_from_array(data.astype(np.float32), name=f"synthetic_{n_slices}")


def sample_slices(size: int) -> Any:
    """Every foreground axial slice of the bundled sample scan at ``size`` px, for training."""
    from pseudohealthy.data.dataset import HealthySlices
    from pseudohealthy.data.sample import sample_scan_path

    return HealthySlices.from_scans([(sample_scan_path(), None)], size=size, seed=0)


def _preset_size(preset: str) -> int:
    from pseudohealthy.model.network import get_preset

    return get_preset(preset).image_size


# --------------------------------------------------------------------------- env


def step_env(record: Record, plan: Plan) -> None:
    """Versions of the stack, the GPUs, the measured matmul rate and the UNet's FLOPs per stage."""
    cuda = torch.cuda.is_available()
    record.fig(cuda_available=cuda, gpu_count=torch.cuda.device_count() if cuda else 0)
    record.fig(**versions())
    if cuda:
        device = torch.device("cuda", 0)
        record.fig(
            device_name=torch.cuda.get_device_name(device),
            peak_tflops_datasheet=device_peak_tflops(device),
            matmul_bf16_tflops=matmul_tflops(device),
        )
    else:
        record.fig(device_name="CPU", peak_tflops_datasheet=NOT_MEASURED, matmul_bf16_tflops=NOT_MEASURED)
        record.fig(matmul_fp32_cpu_tflops=matmul_tflops(torch.device("cpu"), n=1024, repeats=3))
        built = torch.version.cuda
        record.note(
            f"torch {torch.__version__} is a CPU build"
            if built is None
            else f"torch {torch.__version__} is built with CUDA {built} but sees no CUDA device"
        )
    presets = {plan.restore_preset, plan.train_preset, plan.small_preset}
    presets = sorted(presets | ({"paper"} if cuda or not plan.quick else set()))
    stages = {p: unet_flops_by_stage(p) for p in presets}
    record.fig(unet_gflop_per_pass={p: sum(st["total"] for st in stages[p].values()) for p in presets})
    record.fig(flops_by_stage=stages)


def step_ensemble(record: Record, plan: Plan) -> None:
    """Write the random-weight ensembles the restore steps load (timed: the set-up of the slot)."""
    wanted = {(plan.restore_preset, plan.restore_members), (plan.equiv_preset, plan.equiv_members)}
    for preset, n in sorted(wanted, key=lambda pn: -pn[1]):  # the largest first: the others select from it
        t0 = time.perf_counter()
        ensemble = ensure_ensemble(plan, preset, n)
        record.fig(**{f"{preset}_members": len(ensemble), f"{preset}_write_s": time.perf_counter() - t0})
    record.check("written", True, "random-weight members written to the scratch folder")


# --------------------------------------------------------------------------- restore


def _viewer_order(volume: Any, ensemble: Any, settings: Any) -> list[int]:
    """The foreground slices with the middle one first, as the viewer asks for the slice on screen."""
    from pseudohealthy.engine.restore import prepare_for

    fg = [int(k) for k in prepare_for(volume, ensemble, settings).indices]
    mid = fg[len(fg) // 2]
    return [mid, *[k for k in fg if k != mid]]


def timed_restore(
    volume: Any,
    ensemble: Any,
    settings: Any,
    slices: Sequence[int],
    *,
    stop_at: float,
    flops_per_pass: int,
    volume_slices: int,
) -> dict[str, Any]:
    """Restore ``slices`` through ``restore_iter``, stopping at ``stop_at`` (wall clock); seconds
    per volume of ``volume_slices`` slices (measured, or extrapolated from the finished slices or
    the finished slice-steps), the first slice's latency, peak GPU memory and TFLOP/s."""
    from pseudohealthy.engine.restore import SliceResult, restore_iter

    device = _device(settings.device)
    _reset_peak(device)
    t0 = time.perf_counter()
    run = restore_iter(volume, ensemble, settings, slices=slices, should_stop=lambda: time.time() > stop_at)
    n_steps, members = run.plan.n_steps, len(ensemble)
    first = last = None
    done = 0
    progress = (0, 0.0)
    for item in run:
        now = time.perf_counter() - t0
        if isinstance(item, SliceResult):
            done += 1
            last = now
            first = now if first is None else first
        else:
            progress = (item.done, now)
    elapsed = time.perf_counter() - t0
    out: dict[str, Any] = {"slices_asked": len(slices), "slices_done": done, "seconds": elapsed}
    out.update(_peak(device))
    if done == len(slices):
        slice_steps, seconds = done * n_steps, elapsed
    elif done:
        slice_steps, seconds = done * n_steps, last
    else:  # no batch finished: the denoising steps done so far (launch times, maps excluded)
        slice_steps, seconds = progress
    out["finished"] = done == len(slices)
    out["extrapolated"] = not (out["finished"] and done == volume_slices)
    out["first_slice_s"] = first
    if slice_steps and seconds:
        rate = slice_steps / seconds  # slice-steps per second
        out["s_per_volume"] = volume_slices * n_steps / rate
        out["tflops"] = flops_per_pass * members * rate / 1e12
        peak = device_peak_tflops(device)
        out["fraction_of_peak"] = out["tflops"] / peak if peak else NOT_MEASURED
        out["measured_slice_steps"] = slice_steps
    else:
        out["s_per_volume"] = None
    return out


def _restore(record: Record, plan: Plan, compile_mode: str | None) -> None:
    """Restore the 155-slice volume at the default sampler and at DDPM 50, eager or compiled.

    Each batch shape of the timed runs is warmed up first with one denoising step (weights onto
    the device, kernels picked; compiled: one compilation per shape, timed), the one-slice shape
    first so that the slice-on-screen latency is measured even if compiling the rest overruns;
    compiled, the volume run restores whole batches only (128 of 155 slices at 32 per batch) and
    is extrapolated, which saves compiling the remainder's shape.
    """
    from pseudohealthy.engine.defaults import default_steps
    from pseudohealthy.engine.frame import default_batch_size
    from pseudohealthy.engine.restore import restore_volume
    from pseudohealthy.engine.settings import RestoreSettings

    device = _device(plan.device)
    ensemble = ensure_ensemble(plan, plan.restore_preset, plan.restore_members)
    volume = synthetic_volume()
    settings = RestoreSettings(device=plan.device, compile=compile_mode)
    order = _viewer_order(volume, ensemble, settings)
    batch = default_batch_size(device, ensemble.image_size)
    timed = order if plan.restore_slices is None else order[: plan.restore_slices]
    if compile_mode and len(timed) > batch:  # whole batches only: a remainder batch compiles once more
        timed = timed[: len(timed) // batch * batch]
    ddpm_slices = order[: plan.ddpm_slices]
    flops = unet_flops(plan.restore_preset)
    record.fig(
        preset=plan.restore_preset,
        members=len(ensemble),
        volume_slices=len(order),
        sampler=settings.sampler,
        steps=settings.steps,
        batch_size=batch,
        compile=compile_mode,
        unet_gflop_per_pass=flops / 1e9,
    )
    warm = dataclasses.replace(settings, sampler="ddim", steps=1)
    warmed: dict[str, float] = {}

    def warm_up(n: int) -> None:
        if str(n) not in warmed:
            t0 = time.perf_counter()
            restore_volume(volume, ensemble, warm, slices=timed[:n])
            warmed[str(n)] = time.perf_counter() - t0
            record.fig(warmup_s_by_batch=warmed, warmup_s=sum(warmed.values()))

    common = dict(flops_per_pass=flops, volume_slices=len(order))
    warm_up(1)
    one = timed_restore(
        volume, ensemble, settings, order[:1], stop_at=time.time() + record.left() / 4, **common
    )
    record.fig(one_slice_s=one["seconds"] if one["slices_done"] else None, one_slice=one)
    for n in (min(batch, len(timed)), len(timed) % batch, len(ddpm_slices)):
        if n:
            warm_up(n)
    budget = record.left() - max(5.0, 0.05 * record.left())
    default = timed_restore(volume, ensemble, settings, timed, stop_at=time.time() + 0.6 * budget, **common)
    record.fig(default=default)
    ddpm = dataclasses.replace(settings, sampler="ddpm", steps=default_steps("ddpm"))
    stop = record.deadline - max(3.0, 0.03 * (record.deadline - time.time()))
    ddpm50 = timed_restore(volume, ensemble, ddpm, ddpm_slices, stop_at=stop, **common)
    record.fig(ddpm50=ddpm50)
    record.check(
        "default sampler restored",
        default["slices_done"] > 0 and default["s_per_volume"] is not None,
        f"{default['slices_done']} of {len(timed)} slices in {default['seconds']:.1f} s",
    )
    for label, got in (("default sampler", default), ("DDPM 50", ddpm50)):
        if got["extrapolated"]:
            done = f"{got['slices_done']} slice(s)" if got["slices_done"] else "the slice-steps done"
            record.note(f"{label}: s/volume extrapolated from {done} to {len(order)} slices")


def step_restore_eager(record: Record, plan: Plan) -> None:
    """Restoration, eager."""
    _restore(record, plan, None)


def step_restore_compiled(record: Record, plan: Plan) -> None:
    """Restoration with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU); what
    inductor says about CUDA graphs (e.g. why it skipped them) is kept."""
    with contextlib.suppress(Exception):  # a torch without these log switches: no messages
        torch._logging.set_logs(perf_hints=True)
    with _captured("torch", logging.DEBUG) as messages:
        try:
            _restore(record, plan, "reduce-overhead")
        finally:
            graphs = sorted({m[:200] for m in messages if "cudagraph" in m.lower()})
            record.fig(cudagraph_messages=graphs[:10])


# --------------------------------------------------------------------------- equivalence


def _map_difference(a: Any, b: Any, masks: Sequence[np.ndarray], slices: Sequence[int]) -> dict[str, float]:
    """Largest and mean |difference| of two runs' anomaly maps on the foreground, and of the scores."""
    diffs = [np.abs(a.anomaly[:, :, k] - b.anomaly[:, :, k])[m] for k, m in zip(slices, masks, strict=True)]
    return {
        "max_abs": float(max(d.max() for d in diffs)),
        "mean_abs": float(np.mean(np.concatenate(diffs))),
        "max_abs_score": float(max(abs(a.slice_scores[k] - b.slice_scores[k]) for k in slices)),
    }


def step_equivalence(record: Record, plan: Plan) -> None:
    """Engine vs the naive loop in float32, and fp16/bf16 autocast vs float32, on the sample scan."""
    from pseudohealthy.data.io import load_scan
    from pseudohealthy.data.sample import sample_scan_path
    from pseudohealthy.engine.reference import naive_maps
    from pseudohealthy.engine.restore import prepare_for, restore_volume
    from pseudohealthy.engine.settings import RestoreSettings

    device = _device(plan.device)
    ensemble = ensure_ensemble(plan, plan.equiv_preset, plan.equiv_members)
    volume = load_scan(sample_scan_path())
    fp32 = RestoreSettings(device=plan.device, precision="fp32", batch_size=plan.equiv_slices)
    prepared = prepare_for(volume, ensemble, fp32)
    fg = [int(k) for k in prepared.indices]
    slices = fg[len(fg) // 2 :][: plan.equiv_slices]
    masks = [prepared.foreground[:, :, k] for k in slices]
    record.fig(
        preset=plan.equiv_preset, members=len(ensemble), slices=slices, sampler=fp32.sampler, steps=fp32.steps
    )
    with _strict_fp32():
        t0 = time.perf_counter()
        ref = restore_volume(volume, ensemble, fp32, slices=slices)
        one_run = time.perf_counter() - t0
        naive = naive_maps(prepared, ensemble, fp32, slices, device)
    geo = prepared.geometry
    worst = max(
        float(np.abs(np.clip(geo.from_model(naive[k]), 0, 1) - ref.anomaly[:, :, k])[m].max())
        for k, m in zip(slices, masks, strict=True)
    )
    tol = TOL_NAIVE_CUDA if plan.cuda else TOL_NAIVE_CPU
    record.fig(engine_vs_naive_fp32_max_abs=worst, engine_vs_naive_tolerance=tol)
    record.check(
        "engine = naive loop (fp32)", worst <= tol, f"largest |map difference| {worst:.2e} (<= {tol:g})"
    )
    if plan.cuda:  # torch's default on CUDA: TF32 convolutions
        tf32 = restore_volume(volume, ensemble, fp32, slices=slices)
        record.fig(fp32_tf32_vs_strict=_map_difference(tf32, ref, masks, slices))
    for precision in ("fp16", "bf16"):
        if record.left() < 3 * one_run + 5:  # CPU autocast can be several times slower than float32
            record.note(f"{precision} vs fp32 not compared: too little of the step's budget left")
            continue
        settings = dataclasses.replace(fp32, precision=precision)
        diff = _map_difference(restore_volume(volume, ensemble, settings, slices=slices), ref, masks, slices)
        record.fig(**{f"{precision}_vs_fp32": diff, f"{precision}_tolerance": TOL_HALF[precision]})
        tol = TOL_HALF[precision]
        ok = diff["mean_abs"] <= tol and diff["max_abs_score"] <= tol
        record.check(
            f"{precision} = fp32",
            ok,
            f"mean |map difference| {diff['mean_abs']:.2e}, largest {diff['max_abs']:.2e}, "
            f"|score difference| {diff['max_abs_score']:.2e} (mean and score <= {tol:g})",
        )
    if device.type != "cuda":
        record.note("fp16/bf16 ran as CPU autocast (a rehearsal of the code path, not the GPU's numerics)")


# --------------------------------------------------------------------------- training


def _read_log(member: Path) -> list[dict[str, float]]:
    """``log.csv`` rows with float values (an empty loss, a non-finite one, reads NaN)."""
    with open(member / "log.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()} for r in rows]


def _inter_dir(size: int) -> str | None:
    """None when scikit-image's bundled photographs load (the ``poisson_inter`` task's default
    sources), else the bundled MNI template's folder: a machine without network cannot fetch them."""
    from pseudohealthy.data.anomalies import load_inter_sources
    from pseudohealthy.data.sample import sample_data_dir

    try:
        load_inter_sources(None, size)
        return None
    except Exception as exc:  # a scikit-image that would download them
        log.warning("scikit-image's photographs did not load (%s): poisson_inter uses the MNI template", exc)
        return str(sample_data_dir() / "mni152")


def _train_config(plan: Plan, preset: str, **kw: Any) -> Any:
    from pseudohealthy.training.config import TrainConfig

    base = dict(
        inter_dir=_inter_dir(_preset_size(preset)),
        batch_size=plan.train_batch,
        val_every=0,
        ckpt_every=0,
        log_every=plan.train_log_every,
        device=plan.device,
        quiet=True,
        lr=plan.train_lr,
        num_workers=plan.train_workers,
        fold=0,
    )
    return TrainConfig.for_preset(preset, **{**base, **kw})


def _loader_rate(data: Any, config: Any, n_batches: int, stop_at: float) -> float | None:
    """Batches per second that the training data alone deliver (the corruptions run on the CPU,
    in ``config.num_workers`` loader processes): above the training's steps/s, data do not bound it."""
    from pseudohealthy.data.anomalies import fold_tasks, load_inter_sources
    from pseudohealthy.data.dataset import CorruptedSliceDataset, EpochBatchSampler

    tasks, _ = fold_tasks(config.fold)
    inter = load_inter_sources(config.inter_dir, size=data.size)
    dataset = CorruptedSliceDataset(data, data.train_index, tasks, p_none=config.p_none, inter_sources=inter)
    sampler = EpochBatchSampler(len(dataset), config.batch_size)
    batches = iter(
        torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers)
    )
    next(batches)  # the workers started
    t0, n = time.perf_counter(), 0
    while n < n_batches and time.time() < stop_at:
        next(batches)
        n += 1
    seconds = time.perf_counter() - t0
    del batches
    return n / seconds if n and seconds > 0 else None


def _train(record: Record, plan: Plan, precision: str) -> None:
    """Train ``plan.train_preset`` with autocast ``precision``: steps/s, peak memory, the loss."""
    from pseudohealthy.model.checkpoint import read_info
    from pseudohealthy.training.loop import train_member
    from pseudohealthy.training.state import STATE_DIR, read_state_info

    device = _device(plan.device)
    data = sample_slices(_preset_size(plan.train_preset))
    work = Path(plan.work)
    record.fig(preset=plan.train_preset, batch_size=plan.train_batch, precision=precision, slices=len(data))
    # calibration: warm-up (kernels, allocator, loader) and the seconds per step that size the run
    t0 = time.perf_counter()
    calib = _train_config(
        plan, plan.train_preset, steps=plan.train_calibration, precision=precision, log_every=1
    )
    train_member(data, work / f"train_{precision}_calibration", calib)
    calib_s = time.perf_counter() - t0
    times = [r["time"] for r in _read_log(work / f"train_{precision}_calibration")]
    per_step = max(1e-3, (times[-1] - times[0]) / max(1, len(times) - 1))
    setup = max(0.0, calib_s - per_step * len(times))
    reserve = max(5.0, 0.1 * record.left()) + min(12.0, 0.15 * record.left())  # the checks, the loader
    fit = int((record.left() - setup - reserve) / per_step)
    steps = max(min(plan.train_steps, fit), min(plan.train_steps, 10))
    record.fig(calibration_s=calib_s, planned_steps=steps, setup_s=setup)
    _reset_peak(device)
    member = work / f"train_{precision}"
    train_member(data, member, _train_config(plan, plan.train_preset, steps=steps, precision=precision))
    record.fig(**_peak(device))
    rows = _read_log(member)
    losses = np.array([r["loss"] for r in rows])
    skip = min(max(1, len(rows) // 10), len(rows) - 2) if len(rows) > 2 else 0  # rows of the warm-up
    (s0, t0_), (s1, t1) = (rows[skip]["step"], rows[skip]["time"]), (rows[-1]["step"], rows[-1]["time"])
    rate = (s1 - s0) / (t1 - t0_) if t1 > t0_ else None
    q = max(1, len(losses) // 4)
    first, last = float(np.mean(losses[:q])), float(np.mean(losses[-q:]))
    flops = unet_flops(plan.train_preset)
    record.fig(
        steps=int(rows[-1]["step"]),
        steps_per_s=rate,
        slices_per_s=rate * plan.train_batch if rate else None,
        approx_tflops=3 * flops * plan.train_batch * rate / 1e12 if rate else None,
        loss_first_quarter=first,
        loss_last_quarter=last,
        loss_points=len(losses),
    )
    if record.left() > 8:
        cfg = _train_config(plan, plan.train_preset, steps=steps, precision=precision)
        loader = _loader_rate(data, cfg, 50 if plan.cuda else 10, time.time() + min(12.0, record.left() / 3))
        record.fig(loader_batches_per_s=loader)
        if loader and rate and loader < 1.5 * rate:
            record.note(
                f"data-bound: the loader alone gives {loader:.3g} batches/s, training {rate:.3g} steps/s"
            )
    record.check("loss finite", bool(np.isfinite(losses).all()), f"{len(losses)} logged losses")
    record.check(
        "loss falling", last < first, f"mean of the first quarter {first:.4f}, of the last {last:.4f}"
    )
    info = read_info(member)
    recorded = info.get("training", {}).get("precision")
    record.check("precision used", recorded == precision, f"member records precision {recorded}")
    scaler = read_state_info(member / STATE_DIR).get("scaler") or {}
    record.fig(grad_scaler=scaler or "disabled")
    if precision == "fp16":
        scale = scaler.get("scale")
        ok = isinstance(scale, int | float) and math.isfinite(scale) and scale > 0
        record.check("GradScaler active", ok, f"loss scale {scale} after {steps} steps")
    if not plan.cuda:
        record.note("CPU autocast: a rehearsal of the AMP code path; GPU speed and memory not measured")


def step_train_fp16(record: Record, plan: Plan) -> None:
    """Training with AMP fp16 and the gradient scaler."""
    _train(record, plan, "fp16")


def step_train_bf16(record: Record, plan: Plan) -> None:
    """Training with AMP bf16."""
    _train(record, plan, "bf16")


# --------------------------------------------------------------------------- kill and resume


def _final_state(member: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    from pseudohealthy.training.state import STATE_DIR, read_state_info

    info = read_state_info(member / STATE_DIR)
    return load_file(member / STATE_DIR / info["tensors"]), info


def _compare_states(a: Path, b: Path) -> dict[str, Any]:
    """Bitwise equality and the largest |difference| of two members' final resumable states."""
    (ta, ia), (tb, ib) = _final_state(a), _final_state(b)
    same_keys = ta.keys() == tb.keys()
    worst = max(
        (float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if k in tb), default=math.nan
    )
    identical = same_keys and all(torch.equal(ta[k], tb[k]) for k in ta)
    return {
        "identical": identical,
        "max_abs_difference": worst,
        "same_keys": same_keys,
        "step": [ia["step"], ib["step"]],
        "scaler_equal": ia.get("scaler") == ib.get("scaler"),
    }


def _worker_cmd(plan: Plan, spec: dict[str, Any], name: str) -> tuple[list[str], Path]:
    from pseudohealthy.data.files import write_json

    path = write_json(Path(plan.work) / f"{name}_spec.json", spec)
    return [sys.executable, plan.script, "--worker", str(path)], path


def _wait_for_state(state_dir: Path, step: int, alive: Callable[[], bool], deadline: float) -> int | None:
    """Poll until ``latest.json`` in ``state_dir`` reaches ``step``; its step, or None."""
    from pseudohealthy.training.state import LATEST

    while time.time() < deadline and alive():
        with contextlib.suppress(OSError, ValueError, KeyError):
            saved = int(json.loads((state_dir / LATEST).read_text())["step"])
            if saved >= step:
                return saved
        time.sleep(0.02)
    return None


def _train_to_kill(data: Any, out: Path, config: Any) -> None:
    from pseudohealthy.training.loop import train_member

    train_member(data, out, config)


def step_kill_resume(record: Record, plan: Plan) -> None:
    """Train fp16 in a process killed (SIGKILL) after its first checkpoint, resume it, and compare
    the final state with an uninterrupted run's (deterministic kernels where torch has them)."""
    import multiprocessing

    from pseudohealthy.training.loop import train_member
    from pseudohealthy.training.state import STATE_DIR

    _deterministic()
    k = plan.resume_every
    data = sample_slices(_preset_size(plan.small_preset))
    cfg = _train_config(
        plan,
        plan.small_preset,
        steps=2 * k,
        ckpt_every=k,
        log_every=1,
        batch_size=plan.small_batch,
        precision="fp16",
        num_workers=0,
        seed=3,
        fold=1,
    )
    work = Path(plan.work)
    record.fig(preset=plan.small_preset, batch_size=plan.small_batch, steps=2 * k, checkpoint_every=k)
    straight, killed = work / "resume_straight", work / "resume_killed"
    # the run to kill first: forked before this process starts CUDA (a fork cannot use it after)
    slow = dataclasses.replace(cfg, step_delay=0.3)
    proc = multiprocessing.get_context("fork").Process(target=_train_to_kill, args=(data, killed, slow))
    proc.start()
    saved = _wait_for_state(killed / STATE_DIR, k, proc.is_alive, record.deadline - 5)
    with contextlib.suppress(OSError):
        os.kill(proc.pid, 9)  # SIGKILL: no clean-up of any kind
    proc.join(30)
    if saved is None:
        why = (
            "before the step's deadline"
            if proc.exitcode == -9
            else f"(it ended with exit code {proc.exitcode})"
        )
        raise RuntimeError(f"the run to kill wrote no checkpoint of step {k} {why}")
    record.fig(killed_at_step=saved)
    record.check(
        "really interrupted", not (killed / "pseudohealthy.json").exists(), f"killed after step {saved}"
    )
    train_member(data, straight, cfg)
    t0 = time.perf_counter()
    train_member(data, killed, cfg, resume=True)
    record.fig(resume_s=time.perf_counter() - t0)
    cmp = _compare_states(straight, killed)
    record.fig(**cmp)
    if plan.cuda:
        ok = cmp["same_keys"] and cmp["max_abs_difference"] <= TOL_RESUME_CUDA and cmp["scaler_equal"]
        worst = cmp["max_abs_difference"]
        detail = f"bitwise {cmp['identical']}, largest |difference| {worst:.2e} (<= {TOL_RESUME_CUDA:g})"
    else:
        ok, detail = cmp["identical"] and cmp["scaler_equal"], f"bitwise {cmp['identical']}"
    record.check("state identical to an uninterrupted run", ok, detail)
    a, b = _read_log(straight), _read_log(killed)
    same = [r["loss"] for r in a] == [r["loss"] for r in b]
    record.check("same losses", same, f"{len(a)} vs {len(b)} rows")


# --------------------------------------------------------------------------- DDP


def step_ddp(record: Record, plan: Plan) -> None:
    """``torchrun --nproc-per-node=N`` (NCCL on CUDA, gloo on the CPU): a few steps, then every
    rank's weights compared at each checkpoint."""
    n = plan.ddp_ranks
    work = Path(plan.work)
    cfg = _train_config(
        plan,
        plan.small_preset,
        steps=plan.ddp_steps,
        ckpt_every=2,
        batch_size=plan.small_batch,
        num_workers=0,
    )
    report = work / "ddp_report.json"
    spec = {
        "config": cfg.to_dict(),
        "out": str(work / "ddp" / "fold_0"),
        "report": str(report),
        "single_rank_group": True,
    }
    cmd, _ = _worker_cmd(plan, spec, "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *cmd[1:]]
    record.fig(ranks=n, preset=plan.small_preset, steps=plan.ddp_steps, batch_size_per_rank=plan.small_batch)
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    limit = max(10.0, record.left() - 5)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=limit)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"torchrun did not finish within {limit:.0f} s") from None
    record.fig(seconds=time.perf_counter() - t0, returncode=proc.returncode)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        record.fig(stderr_tail=lines[-15:])
        errors = [ln for ln in lines if "Error" in ln and "ChildFailedError" not in ln]
        raise RuntimeError(f"torchrun exited with {proc.returncode}: {(errors or lines)[-1].strip()}")
    got = json.loads(report.read_text())
    record.fig(
        backend=got["backend"],
        world_size=got["world_size"],
        checkpoints=len(got["records"]),
        single_rank_group=got.get("single_rank_group"),
    )
    expected = "nccl" if plan.cuda else "gloo"
    record.check("backend", got["backend"] == expected, f"{got['backend']} (expected {expected})")
    digests = [{r["digest"] for r in ranks} for ranks in got["records"]]
    same = bool(digests) and all(len(d) == 1 for d in digests)
    record.check(
        "identical weights on every rank", same, f"{len(digests)} checkpoint(s) compared over {n} rank(s)"
    )
    record.check("steps done", got.get("steps_done") == plan.ddp_steps, f"{got.get('steps_done')} steps")
    if n == 1:
        record.check(
            "single-rank group",
            "ok" in (got.get("single_rank_group") or ""),
            str(got.get("single_rank_group")),
        )
        record.note(
            f"torchrun with 1 process: the check opened the {expected} group itself (world size 1), so the "
            "loop's collectives ran on it, but DDP wrapping needs 2 or more ranks and was not exercised"
        )


# --------------------------------------------------------------------------- out of memory


@contextlib.contextmanager
def _captured(logger: str, level: int = logging.WARNING) -> Iterator[list[str]]:
    """The messages of ``logger`` (and its children) at ``level`` and above while the block runs."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            messages.append(rec.getMessage())

    handler = Keep(level)
    logging.getLogger(logger).addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger(logger).removeHandler(handler)


@contextlib.contextmanager
def _memory_limit(device: torch.device, limit_bytes: float) -> Iterator[float]:
    """``torch.cuda.set_per_process_memory_fraction`` for ``limit_bytes`` (lifted afterwards)."""
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, max(1e-4, limit_bytes / total))
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield fraction
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _simulated_restore_oom(max_batch: int) -> Iterator[None]:
    """Batches above ``max_batch`` raise a CUDA out-of-memory (the CPU rehearsal)."""
    import pseudohealthy.engine.restore as restore

    real = restore.restore_frame_steps

    def flaky(models: Any, names: Any, images: np.ndarray, *args: Any, **kwargs: Any) -> Iterator[Any]:
        if images.shape[0] > max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        yield from real(models, names, images, *args, **kwargs)

    restore.restore_frame_steps = flaky
    try:
        yield
    finally:
        restore.restore_frame_steps = real


def step_oom_restore(record: Record, plan: Plan) -> None:
    """Restore under a memory limit that the batch does not fit: the engine halves the batch and
    must give the maps of the unlimited run (float32, TF32 off)."""
    from pseudohealthy.engine.restore import restore_volume
    from pseudohealthy.engine.settings import RestoreSettings

    device = _device(plan.device)
    ensemble = ensure_ensemble(plan, plan.equiv_preset, plan.equiv_members)
    volume = synthetic_volume()
    batch = 8
    settings = RestoreSettings(
        device=plan.device, precision="fp32", batch_size=batch, sampler="ddim", steps=2
    )
    slices = _viewer_order(volume, ensemble, settings)[:batch]
    record.fig(preset=plan.equiv_preset, members=len(ensemble), batch_size=batch, slices=len(slices))
    with _strict_fp32():
        _reset_peak(device)
        free = restore_volume(volume, ensemble, settings, slices=slices)
        with _captured("pseudohealthy.engine.restore") as warnings:
            if plan.cuda:
                base = torch.cuda.memory_allocated(device)
                peak = torch.cuda.max_memory_allocated(device)
                limit = base + 0.6 * (peak - base)
                record.fig(weights_mib=base / 2**20, peak_batch_mib=peak / 2**20, limit_mib=limit / 2**20)
                with _memory_limit(device, limit) as fraction:
                    record.fig(memory_fraction=fraction)
                    limited = restore_volume(volume, ensemble, settings, slices=slices)
            else:
                with _simulated_restore_oom(batch // 4):
                    limited = restore_volume(volume, ensemble, settings, slices=slices)
    halvings = [m for m in warnings if "out of memory" in m]
    record.fig(halvings=halvings)
    record.check("out of memory forced and the batch halved", bool(halvings), f"{len(halvings)} halving(s)")
    record.check("finished", limited.completed, f"{len(limited.restored)} of {len(slices)} slices")
    worst = max(float(np.abs(limited.anomaly[:, :, k] - free.anomaly[:, :, k]).max()) for k in slices)
    record.fig(max_abs_map_difference=worst)
    record.check(
        "same maps", worst <= TOL_OOM_MAPS, f"largest |difference| {worst:.2e} (<= {TOL_OOM_MAPS:g})"
    )
    if not plan.cuda:
        record.note("out-of-memory simulated (no CUDA device): the memory limit itself was not measured")


@contextlib.contextmanager
def _oom_at_call(n: int, device: torch.device, cuda: bool) -> Iterator[None]:
    """The ``n``-th training loss runs out of memory: under a memory limit just above what is
    held (CUDA), or by raising the error (the CPU rehearsal)."""
    import pseudohealthy.training.loop as loop

    real, calls = loop.training_loss, [0]

    def loss(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            if not cuda:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            held = torch.cuda.memory_reserved(device)
            torch.cuda.set_per_process_memory_fraction(min(1.0, (held + 64 * 2**20) / total), device)
        return real(*args, **kwargs)

    loop.training_loss = loss
    try:
        yield
    finally:
        loop.training_loss = real
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            torch.cuda.empty_cache()


def step_oom_train(record: Record, plan: Plan) -> None:
    """Training runs out of memory after a checkpoint: a one-line error naming the batch size to
    try, the checkpoint untouched, and the run resumable from it."""
    from pseudohealthy.training.config import TrainError
    from pseudohealthy.training.loop import train_member
    from pseudohealthy.training.state import STATE_DIR, read_state_info

    device = _device(plan.device)
    size = plan.train_batch
    data = sample_slices(_preset_size(plan.train_preset))
    cfg = _train_config(plan, plan.train_preset, steps=6, ckpt_every=3, log_every=1, num_workers=0)
    member = Path(plan.work) / "oom_train"
    record.fig(preset=plan.train_preset, batch_size=size)
    message = None
    with _oom_at_call(4, device, plan.cuda):
        try:
            train_member(data, member, cfg)
        except TrainError as exc:
            message = str(exc)
    record.fig(error=message)
    record.check("stopped with a TrainError", message is not None, message or "training did not stop")
    message = message or ""
    wanted = (f"at batch size {size}", f"--batch-size {max(1, size // 2)}", "step 3 stays resumable")
    record.check(
        "one line naming the batch size to try",
        "\n" not in message and all(w in message for w in wanted),
        message,
    )
    state = read_state_info(member / STATE_DIR)
    record.check("checkpoint untouched", state["step"] == 3, f"latest state at step {state['step']}")
    train_member(data, member, cfg, resume=True)
    steps = [int(r["step"]) for r in _read_log(member)]
    record.check("resumed to the end", steps == list(range(1, 7)), f"logged steps {steps}")
    if not plan.cuda:
        record.note("out-of-memory simulated (no CUDA device): the memory limit itself was not measured")


# --------------------------------------------------------------------------- worker (subprocesses)


def _weights_digest(model: torch.nn.Module) -> str:
    from pseudohealthy.training.distributed import unwrap

    h = hashlib.sha256()
    for name, tensor in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _single_rank_group() -> str:
    """Open the process group of a one-process torchrun (NCCL on CUDA, else gloo), which the
    library leaves closed at world size 1, and check an all-reduce on it."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(0)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    x = torch.ones(4, device="cuda" if cuda else "cpu")
    dist.all_reduce(x)
    return f"{backend} all-reduce at world size 1: {'ok' if bool((x == 1).all()) else 'WRONG'}"


def run_worker(spec_path: str) -> int:
    """Train one member from a JSON spec (``config``, ``out``; ``deterministic``, ``resume``,
    ``report``: every rank's weight digest at each checkpoint, written by rank 0)."""
    import torch.distributed as dist

    import pseudohealthy.training.loop as loop
    from pseudohealthy.data.files import write_json
    from pseudohealthy.training.config import TrainConfig
    from pseudohealthy.training.distributed import gather_objects

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("deterministic"):
        _deterministic()
    single = None
    if spec.get("single_rank_group") and os.environ.get("WORLD_SIZE") == "1":
        single = _single_rank_group()
    config = TrainConfig(**{**spec["config"], "betas": tuple(spec["config"]["betas"])})
    records: list[list[dict[str, Any]]] = []
    real_gather: Callable = loop.gather_generators

    def gather_and_compare(run: Any) -> Any:  # every rank calls it at every checkpoint
        records.append(
            gather_objects({"rank": int(os.environ.get("RANK", 0)), "digest": _weights_digest(run.model)})
        )
        return real_gather(run)

    if spec.get("report"):
        loop.gather_generators = gather_and_compare
    loop.train_member(sample_slices(config.image_size), spec["out"], config, resume=bool(spec.get("resume")))
    if spec.get("report") and int(os.environ.get("RANK", 0)) == 0:
        from pseudohealthy.model.checkpoint import read_info

        write_json(
            spec["report"],
            {
                "backend": dist.get_backend() if dist.is_initialized() else "none",
                "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                "records": records,
                "single_rank_group": single,
                "steps_done": read_info(spec["out"])["training"]["steps_done"],
            },
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


STEPS: dict[str, Callable[[Record, Plan], None]] = {
    "env": step_env,
    "ensemble": step_ensemble,
    "restore_eager": step_restore_eager,
    "equivalence": step_equivalence,
    "train_fp16": step_train_fp16,
    "train_bf16": step_train_bf16,
    "kill_resume": step_kill_resume,
    "ddp": step_ddp,
    "oom_restore": step_oom_restore,
    "oom_train": step_oom_train,
    "restore_compiled": step_restore_compiled,
}
