"""The training loop: :func:`train_member` trains one fold's member and writes its folder,
:func:`train_ensemble` the members of several folds one after the other. It follows the
reference (``REFERENCE.md``, "Training"): Min-SNR-weighted epsilon loss with offset noise, AdamW
with constant lr, grad-norm clipping, an EMA of the weights (used for validation and for the
saved member), mixed precision on CUDA, validation on held-out slices corrupted with the fold's
two validation tasks, early stopping on the moving average of the validation loss, keeping the
best; batches come from (seed, epoch) alone and the diffusion noise from a saved generator, so a
resumed run ends where an uninterrupted one would have (exactly, on the CPU). Under ``torchrun``
batches are sharded over the ranks, the model is wrapped in DDP and only rank 0 validates and
writes files. A CUDA out-of-memory in a training step stops the run with a one-line
:class:`~pseudohealthy.training.config.TrainError` naming the batch size to try; the last
resumable state stays as it was.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from pseudohealthy.data.anomalies import TASKS, fold_tasks, load_inter_sources
from pseudohealthy.data.dataset import (
    CorruptedSliceDataset,
    EpochBatchSampler,
    HealthySlices,
    ValidationSet,
    build_validation,
)
from pseudohealthy.device import autocast, autocast_dtype
from pseudohealthy.model.checkpoint import is_checkpoint_dir, save_checkpoint
from pseudohealthy.model.diffusion import Schedule, to_model_range, training_loss
from pseudohealthy.model.ema import EMA
from pseudohealthy.model.network import ModelConfig, build_model, count_parameters
from pseudohealthy.training.config import TrainConfig, TrainError, member_dir, member_seed
from pseudohealthy.training.distributed import (
    DistInfo,
    barrier,
    broadcast_from_main,
    init_distributed,
    mean_over_ranks,
)
from pseudohealthy.training.logs import CsvLog, EarlyStop, open_tensorboard
from pseudohealthy.training.state import (
    LATEST,
    STATE_DIR,
    RunState,
    check_resume,
    gather_generators,
    load_state,
    read_state_info,
    save_best_weights,
    save_state,
)
from pseudohealthy.training.validation import validate

__all__ = ["train_ensemble", "train_member"]

log = logging.getLogger(__name__)

_PRECISION_NAMES = {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class _Session:
    """One member's training as :func:`_set_up` prepares it: settings, state, data and writers."""

    config: TrainConfig
    model_cfg: ModelConfig
    out_dir: Path
    dist_info: DistInfo
    device: torch.device
    seed: int
    run: RunState
    summary: Mapping[str, Any]
    resumed_from: int | None = None
    model: nn.Module | None = None  # run.model, in DDP under torchrun
    loader: torch.utils.data.DataLoader | None = None
    val: ValidationSet | None = None
    schedule: Schedule | None = None
    amp: torch.dtype | None = None
    csv_log: CsvLog | None = None
    tb: Any = None
    bar: Any = None
    val_seed: int = 0
    running: torch.Tensor | None = None  # sum of the losses since the last logged mean
    n_running: int = 0

    @property
    def main(self) -> bool:
        return self.dist_info.is_main

    @property
    def fold(self) -> int:
        return int(self.config.fold)

    @property
    def state_dir(self) -> Path:
        return self.out_dir / STATE_DIR


def train_member(
    data: HealthySlices,
    out_dir: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    inter_sources: Sequence[np.ndarray] | None = None,
) -> Path:
    """Train the member of ``config.fold`` on ``data`` into ``out_dir``; returns ``out_dir``.

    ``out_dir`` receives ``model.safetensors`` + ``pseudohealthy.json`` (the EMA weights of the
    best validation, or the last EMA weights without validation; see
    :func:`pseudohealthy.model.checkpoint.save_checkpoint`), ``log.csv`` and ``train_state/`` (the
    resumable state). ``resume`` continues from ``train_state/`` (or skips a finished member);
    without it an existing run is refused.
    """
    config.validate()
    out_dir = Path(out_dir)
    dist_info, device = init_distributed(config.device)
    model_cfg = config.model_config()
    if model_cfg.image_size != data.size:
        raise TrainError(f"the slices are {data.size} px but the model expects {model_cfg.image_size} px")
    has_state = (out_dir / STATE_DIR / LATEST).is_file()
    if _finished_or_refused(out_dir, has_state, resume):
        return out_dir
    session = _set_up(
        data,
        out_dir,
        config,
        model_cfg,
        dist_info,
        device,
        from_state=resume and has_state,
        inter_sources=inter_sources,
    )
    _train_steps(session)
    _finish(session, data)
    return out_dir


# --------------------------------------------------------------------------- set-up


def _finished_or_refused(out_dir: Path, has_state: bool, resume: bool) -> bool:
    """True for a finished member to skip; raise for an existing run without ``resume``."""
    if is_checkpoint_dir(out_dir):
        if resume:
            log.info("%s: already trained, skipped", out_dir)
            return True
        raise TrainError(f"{out_dir}: a trained member is already there (use --resume to skip it)")
    if has_state and not resume:
        raise TrainError(f"{out_dir}: an interrupted run is there (use --resume to continue it)")
    return False


def _build_run(
    model_cfg: ModelConfig, config: TrainConfig, device: torch.device, seed: int, rank: int
) -> RunState:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global stream
        torch.manual_seed(seed)
        net = build_model(model_cfg)
    net.to(device)
    ema = EMA(net, config.ema_max_decay)
    fused = True if device.type == "cuda" else None
    optimizer = torch.optim.AdamW(
        net.parameters(),
        lr=config.lr,
        betas=tuple(config.betas),
        weight_decay=config.weight_decay,
        fused=fused,
    )
    amp = autocast_dtype(device, config.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    gen_seed = int(np.random.SeedSequence([seed, rank, 7]).generate_state(1)[0])
    generator = torch.Generator(device=device).manual_seed(gen_seed)  # on the device: no host sync
    return RunState(net, ema, optimizer, scaler, generator, EarlyStop(config.early_stop_patience))


def _set_up(
    data: HealthySlices,
    out_dir: Path,
    config: TrainConfig,
    model_cfg: ModelConfig,
    dist_info: DistInfo,
    device: torch.device,
    *,
    from_state: bool,
    inter_sources: Sequence[np.ndarray] | None,
) -> _Session:
    """Build the run (resumed from ``train_state/`` when ``from_state``), data, model and writers."""
    train_tasks, val_tasks = fold_tasks(int(config.fold))
    seed = member_seed(config.seed, int(config.fold))
    run = _build_run(model_cfg, config, device, seed, dist_info.rank)
    s = _Session(config, model_cfg, out_dir, dist_info, device, seed, run, data.summary())
    if from_state:
        _resume(s)
    if inter_sources is None and 1 in train_tasks + val_tasks:
        inter_sources = load_inter_sources(config.inter_dir, size=data.size)
    dataset = CorruptedSliceDataset(
        data, data.train_index, train_tasks, seed=seed, p_none=config.p_none, inter_sources=inter_sources
    )
    s.val = _validation_set(s, data, val_tasks, inter_sources)
    s.loader = _loader(s, dataset)
    s.model = _wrap_model(s)
    s.schedule = Schedule()
    s.amp = autocast_dtype(device, config.precision)
    if s.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _log_start(s, data, train_tasks, val_tasks)
    s.csv_log = CsvLog(out_dir / "log.csv", s.resumed_from) if s.main else None
    s.tb = open_tensorboard(out_dir / "tensorboard") if s.main else None
    s.bar = _progress_bar(s)
    s.val_seed = int(np.random.SeedSequence([seed, 99]).generate_state(1)[0])
    s.running = torch.zeros((), device=device, dtype=torch.float64)
    return s


def _resume(s: _Session) -> None:
    """Load the latest resumable state into ``s.run`` after checking it matches this run."""
    info = read_state_info(s.state_dir)
    check_resume(info, s.config, s.summary, s.out_dir)
    load_state(s.state_dir, info, s.run, s.dist_info)
    s.resumed_from = s.run.step
    if s.main:
        log.info("fold %d: resuming at step %d", s.fold, s.run.step)


def _validation_set(
    s: _Session, data: HealthySlices, val_tasks: Sequence[int], inter_sources: Sequence[np.ndarray] | None
) -> ValidationSet | None:
    """The held-out slices corrupted with the validation tasks (rank 0 only; None without)."""
    config = s.config
    if not (s.main and config.val_every and data.val_index.size):
        return None
    return build_validation(
        data,
        data.val_index,
        val_tasks,
        seed=s.seed,
        p_none=config.p_none,
        inter_sources=inter_sources,
        max_slices=config.val_max_slices,
        progress=not config.quiet,
    )


def _loader(s: _Session, dataset: CorruptedSliceDataset) -> torch.utils.data.DataLoader:
    """Batches of this rank from (seed, epoch), starting at the run's step."""
    sampler = EpochBatchSampler(
        len(dataset),
        s.config.batch_size,
        seed=s.seed,
        start_step=s.run.step,
        rank=s.dist_info.rank,
        world_size=s.dist_info.world_size,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=s.config.num_workers,
        pin_memory=s.device.type == "cuda",
        persistent_workers=s.config.num_workers > 0,
    )


def _wrap_model(s: _Session) -> nn.Module:
    """The model the loss is computed with: ``s.run.model``, in DDP when several ranks train."""
    if not s.dist_info.enabled:
        return s.run.model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        s.run.model, device_ids=[s.device.index] if s.device.type == "cuda" else None
    )


def _log_start(
    s: _Session, data: HealthySlices, train_tasks: Sequence[int], val_tasks: Sequence[int]
) -> None:
    log.info(
        "fold %d: preset %s (%s px, %.2fM parameters), tasks %s, validation %s; %d training / %d "
        "held-out slices; %s, %s, batch %d x %d rank(s)",
        s.fold,
        s.config.preset,
        s.model_cfg.image_size,
        count_parameters(s.run.model) / 1e6,
        "+".join(TASKS[t] for t in train_tasks),
        "+".join(TASKS[t] for t in val_tasks),
        data.train_index.size,
        data.val_index.size,
        s.device,
        _PRECISION_NAMES[s.amp],
        s.config.batch_size,
        s.dist_info.world_size,
    )


def _progress_bar(s: _Session) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=s.config.steps,
        initial=min(s.run.step, s.config.steps),
        desc=f"fold {s.fold}",
        unit="step",
        disable=s.config.quiet or not s.main,
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------- the loop


def _done(s: _Session) -> bool:
    return s.run.step >= s.config.steps or s.run.early.stopped


def _train_steps(s: _Session) -> None:
    """Train until ``config.steps`` or an early stop, validating, logging and checkpointing."""
    config, run = s.config, s.run
    start = time.perf_counter() - run.elapsed
    stop = _done(s)
    batches = iter(s.loader) if not stop else None
    run.model.train()
    while not stop:
        _train_step_or_stop(s, next(batches))
        step = run.step
        run.elapsed = time.perf_counter() - start
        row = _loss_row(s)
        if config.val_every and (step % config.val_every == 0 or step == config.steps):
            _validate_and_check_stop(s, row)
        if row and s.main:
            _write_row(s, row)
        stop = _done(s)
        if (config.ckpt_every and step % config.ckpt_every == 0) or stop:
            _checkpoint(s)
        if config.step_delay:
            time.sleep(config.step_delay)
    del batches  # stops the loader's workers


def _train_step_or_stop(s: _Session, batch: Mapping[str, torch.Tensor]) -> None:
    """:func:`_train_step`; a CUDA out-of-memory stops training with a one-line :class:`TrainError`
    naming the batch size to try (the last resumable state is left as it was)."""
    try:
        _train_step(s, batch)
        return
    except torch.cuda.OutOfMemoryError:
        pass  # handled outside the except block, so that no traceback keeps the step's tensors alive
    _out_of_memory(s)


def _out_of_memory(s: _Session) -> None:
    """Free what the failed step held and raise the :class:`TrainError` of an out-of-memory."""
    s.run.optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    s.bar.close()
    if s.tb is not None:
        s.tb.close()
    size = s.config.batch_size
    where = f"step {s.run.step + 1} on {s.device}" + (
        f", rank {s.dist_info.rank}" if s.dist_info.enabled else ""
    )
    advice = f"try --batch-size {size // 2}" if size > 1 else "use a smaller preset or --precision fp16"
    saved = _saved_step(s.state_dir)
    kept = "" if saved is None else f"; the state of step {saved} stays resumable (--resume, same batch size)"
    raise TrainError(f"out of GPU memory at batch size {size} ({where}): {advice}{kept}")


def _saved_step(state_dir: Path) -> int | None:
    """The step of the latest resumable state in ``state_dir``; None when there is none."""
    try:
        return int(json.loads((state_dir / LATEST).read_text(encoding="utf-8"))["step"])
    except (OSError, KeyError, TypeError, ValueError):
        return None


def _train_step(s: _Session, batch: Mapping[str, torch.Tensor]) -> None:
    """One optimiser step on ``batch``, the EMA update, and the loss added to the running sum."""
    config, run, device = s.config, s.run, s.device
    x0 = to_model_range(batch["x0"].to(device, non_blocking=True))
    cond = to_model_range(batch["cond"].to(device, non_blocking=True)) if s.model_cfg.conditioned else None
    with autocast(device, config.precision):
        loss = training_loss(
            s.model,
            x0,
            cond,
            s.schedule,
            generator=run.generator,
            noise_offset=config.noise_offset,
            min_snr_gamma=config.min_snr_gamma,
        )
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if config.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.ema.update(run.model, run.step)
    run.step += 1
    s.running += loss.detach().double()
    s.n_running += 1
    s.bar.update(1)


def _loss_row(s: _Session) -> dict[str, Any]:
    """The log row of this step: the mean loss over the ranks since the last one, when due."""
    row: dict[str, Any] = {}
    step = s.run.step
    if step % s.config.log_every == 0 or step == s.config.steps:
        mean = mean_over_ranks(s.running / s.n_running)
        row["loss"] = float(mean)
        s.running.zero_()
        s.n_running = 0
        s.bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
    return row


def _validate_and_check_stop(s: _Session, row: dict[str, Any]) -> None:
    """Validate (rank 0), keep the best EMA weights, and stop every rank when patience runs out."""
    run, step = s.run, s.run.step
    stop_flag = torch.zeros((), device=s.device)
    if s.val is not None and len(s.val):
        scores = validate(
            run.ema.module, s.val, s.config, schedule=s.schedule, device=s.device, seed=s.val_seed
        )
        row.update(scores)
        if run.early.update(step, scores["val_loss"], scores["val_ap"], scores.get("val_threshold")):
            save_best_weights(s.state_dir, run)
        if run.early.should_stop(step):
            stop_flag.fill_(1.0)
        if not s.config.quiet:
            ap = scores["val_ap"]
            s.bar.write(
                f"fold {s.fold} step {step}: val_loss {scores['val_loss']:.4f}"
                + (f", val_ap {ap:.3f}" if ap is not None else "")
                + f" (best at step {run.early.best_step})"
            )
    broadcast_from_main(stop_flag)
    if bool(stop_flag):
        run.early.stopped = True
        if s.main:
            log.info("fold %d: early stop at step %d (best step %s)", s.fold, step, run.early.best_step)


def _write_row(s: _Session, row: dict[str, Any]) -> None:
    """Append ``row`` to ``log.csv`` and tensorboard (rank 0)."""
    step = s.run.step
    row.update(step=step, lr=s.run.optimizer.param_groups[0]["lr"], time=s.run.elapsed)
    s.csv_log.write(**row)
    if s.tb is not None:
        for key in ("loss", "val_loss", "val_ap"):
            if row.get(key) is not None:
                s.tb.add_scalar(key, row[key], step)


def _checkpoint(s: _Session) -> None:
    """Write the resumable state (the generators are gathered from every rank, rank 0 writes)."""
    generators = gather_generators(s.run)
    if s.main:
        save_state(s.state_dir, s.run, s.config, s.summary, generators)


# --------------------------------------------------------------------------- finish


def _finish(s: _Session, data: HealthySlices) -> None:
    """Close the writers, write the member folder (rank 0) and wait for every rank."""
    s.bar.close()
    s.loader = None
    if s.tb is not None:
        s.tb.close()
    if s.main:
        _write_member(s, data)
    barrier()


def _write_member(s: _Session, data: HealthySlices) -> None:
    """The member folder: chosen EMA weights + metadata, via :func:`save_checkpoint`."""
    run, config, model_cfg = s.run, s.config, s.model_cfg
    weights: nn.Module = run.ema.module
    chosen = "ema-last"
    best = s.state_dir / run.best_file if run.best_file else None
    if best is not None and best.is_file():
        weights = build_model(model_cfg)
        weights.load_state_dict(load_file(best, device="cpu"), strict=True)
        chosen = "ema-best"
    train_tasks, val_tasks = fold_tasks(config.fold)
    early = run.early
    meta = {
        "modality": config.modality,
        "fold": int(config.fold),
        "train_tasks": [TASKS[t] for t in train_tasks],
        "val_tasks": [TASKS[t] for t in val_tasks],
        "data": dict(s.summary),
        "normalisation": data.normalisation(),
        "validation": {
            "best_val_loss": early.best_val_loss,
            "best_val_loss_ma": early.best_ma,
            "best_val_ap": early.best_val_ap,
            "best_threshold": early.best_val_threshold,
            "best_step": early.best_step,
            "val_loss": early.last_val_loss,
            "val_ap": early.last_val_ap,
            "early_stopped": early.stopped,
        },
        "training": {
            **config.to_dict(),
            "steps_done": run.step,
            "weights": chosen,
            "device": str(s.device),
            "precision": _PRECISION_NAMES[s.amp],
            "world_size": s.dist_info.world_size,
            "time_s": round(run.elapsed, 2),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        },
    }
    meta["training"].pop("quiet", None)
    meta["training"].pop("step_delay", None)
    save_checkpoint(weights, model_cfg, meta, s.out_dir)
    log.info("fold %d: member written to %s (%s weights)", config.fold, s.out_dir, chosen)


def train_ensemble(
    data: HealthySlices,
    run_dir: str | Path,
    config: TrainConfig,
    folds: Iterable[int] = range(10),
    *,
    resume: bool = False,
) -> list[Path]:
    """Train the members of ``folds`` one after the other into ``RUN_DIR/fold_K``."""
    folds = list(folds)
    inter = None
    if any(1 in sum(fold_tasks(f), ()) for f in folds):
        inter = load_inter_sources(config.inter_dir, size=data.size)
    out = []
    for fold in folds:
        cfg = dataclasses.replace(config, fold=int(fold))
        out.append(train_member(data, member_dir(run_dir, fold), cfg, resume=resume, inter_sources=inter))
    return out
