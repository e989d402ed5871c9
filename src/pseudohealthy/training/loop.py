"""The training loop: :func:`train_member` trains one fold's member and writes its folder,
:func:`train_ensemble` the members of several folds one after the other, :func:`initial_network`
gives the weights a member starts from (a seeded initialisation shared by the folds, or another
member's weights). It follows the reference (``REFERENCE.md``, "Training"): Min-SNR-weighted loss
of the schedule's prediction target with offset noise, AdamW
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
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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
from pseudohealthy.device import autocast, autocast_dtype, describe_precision
from pseudohealthy.model.checkpoint import (
    RUNTIME_SETTINGS,
    is_checkpoint_dir,
    load_checkpoint,
    read_info,
    save_checkpoint,
)
from pseudohealthy.model.diffusion import Schedule, training_loss
from pseudohealthy.model.ema import EMA
from pseudohealthy.model.network import ConditionedUNet, ModelConfig, build_model, count_parameters
from pseudohealthy.training.config import (
    FIDELITY_FIELDS,
    TRAINED_HINT,
    TrainConfig,
    TrainError,
    member_dir,
    member_seed,
)
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
from pseudohealthy.training.validation import VALIDATION_FAITHFUL_SSIM, format_fidelity, validate

__all__ = ["check_init_source", "initial_network", "train_ensemble", "train_member"]

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
    val_build: Callable[..., ValidationSet] | None = None  # build_validation(seed=...) of this run
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
    if _finished_or_refused(out_dir, has_state, resume, config.steps):
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


def _finished_or_refused(out_dir: Path, has_state: bool, resume: bool, steps: int) -> bool:
    """True for a finished member to skip; raise for an existing run without ``resume``.

    With ``resume``, a finished member whose resumable state stopped short of ``steps`` is
    continued (extended), as an uninterrupted run of ``steps`` would have gone on; its member
    files are replaced when the longer run finishes.
    """
    if is_checkpoint_dir(out_dir):
        if not resume:
            raise TrainError(f"{out_dir}: a trained member is already there ({TRAINED_HINT})")
        done = _saved_step(out_dir / STATE_DIR)
        if done is not None and done < steps:
            log.info("%s: trained to step %d, extended to %d", out_dir, done, steps)
            return False
        log.info("%s: already trained, skipped", out_dir)
        return True
    if has_state and not resume:
        raise TrainError(f"{out_dir}: an interrupted run is there (use --resume to continue it)")
    return False


def initial_network(
    config: TrainConfig, model_cfg: ModelConfig | None = None
) -> tuple[ConditionedUNet, dict[str, Any] | None]:
    """The network a member's training starts from, and where its weights came from.

    With ``config.init_from``: that member's weights (through the checkpoint loader), after
    checking it has this run's architecture, prediction and model range (a :class:`TrainError`
    names the first field that differs); the record is ``{path, fold, train_tasks, step}``.
    Otherwise a fresh initialisation seeded by :meth:`TrainConfig.net_seed` (record None).
    """
    model_cfg = model_cfg or config.model_config()
    if config.init_from is None:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global stream
            torch.manual_seed(config.net_seed())
            return build_model(model_cfg), None
    path = Path(config.init_from)
    check_init_source(config, model_cfg)
    net, info = load_checkpoint(path, "cpu")
    record = {
        "path": str(path),
        "fold": info.get("fold"),
        "train_tasks": info.get("train_tasks"),
        "step": _source_step(info),
    }
    return net.train(), record


def check_init_source(config: TrainConfig, model_cfg: ModelConfig | None = None) -> None:
    """Refuse ``config.init_from`` when it is not a member (a CheckpointError) or has another
    architecture, prediction or model range than this run (a :class:`TrainError` naming the field);
    reads only its settings, no weights."""
    if config.init_from is None:
        return
    path = Path(config.init_from)
    info = read_info(path)
    model_cfg = model_cfg or config.model_config()
    theirs = ModelConfig.from_dict(info["model"]).to_dict()
    ours = model_cfg.to_dict()
    for name in ours:
        if name not in RUNTIME_SETTINGS and theirs[name] != ours[name]:
            raise TrainError(
                f"cannot start from {path}: its model.{name} is {theirs[name]!r}, this run's is "
                f"{ours[name]!r}"
            )
    schedule = Schedule.from_dict(info["schedule"])
    for name in ("prediction", "centred"):
        if getattr(schedule, name) != getattr(config, name):
            raise TrainError(
                f"cannot start from {path}: its schedule.{name} is {getattr(schedule, name)!r}, this "
                f"run's is {getattr(config, name)!r}"
            )


def _source_step(info: Mapping[str, Any]) -> int | None:
    """The training step of a member's weights (its best validation's, or its last step)."""
    training = info.get("training") or {}
    if training.get("weights") == "ema-best":
        return (info.get("validation") or {}).get("best_step")
    return training.get("steps_done")


def _build_run(
    model_cfg: ModelConfig,
    config: TrainConfig,
    device: torch.device,
    seed: int,
    rank: int,
    *,
    from_state: bool,
) -> RunState:
    # a resumed run loads its weights from the state: the initial member is not read again
    start = dataclasses.replace(config, init_from=None) if from_state else config
    net, init_record = initial_network(start, model_cfg)
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
    early = EarlyStop(config.early_stop_patience)
    return RunState(net, ema, optimizer, scaler, generator, early, init_from=init_record)


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
    run = _build_run(model_cfg, config, device, seed, dist_info.rank, from_state=from_state)
    s = _Session(config, model_cfg, out_dir, dist_info, device, seed, run, data.summary())
    if from_state:
        _resume(s)
    if inter_sources is None and 1 in train_tasks + val_tasks:
        inter_sources = load_inter_sources(config.inter_dir, size=data.size)
    dataset = CorruptedSliceDataset(
        data,
        data.train_index,
        train_tasks,
        seed=seed,
        p_none=config.p_none,
        inter_sources=inter_sources,
        style=config.task_style,
        gamma=config.intensity_gamma,
    )
    s.val_build = _validation_builder(s, data, val_tasks, inter_sources)
    if s.val_build is not None and not config.val_fresh:
        s.val = s.val_build(seed=s.seed)
    s.loader = _loader(s, dataset)
    s.model = _wrap_model(s)
    s.schedule = config.schedule()
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


def _validation_builder(
    s: _Session, data: HealthySlices, val_tasks: Sequence[int], inter_sources: Sequence[np.ndarray] | None
) -> Callable[..., ValidationSet] | None:
    """``build(seed=...)``: the held-out slices corrupted with the validation tasks (rank 0 only;
    None without)."""
    config = s.config
    if not (s.main and config.val_every and data.val_index.size):
        return None
    return functools.partial(
        build_validation,
        data,
        data.val_index,
        val_tasks,
        p_none=config.p_none,
        inter_sources=inter_sources,
        max_slices=config.val_max_slices,
        progress=not config.quiet,
        style=config.task_style,
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
        "fold %d: preset %s (%s px, %.2fM parameters), tasks %s, validation %s (%s style); %d training / %d "
        "held-out slices; %s, %s, batch %d x %d rank(s)",
        s.fold,
        s.config.preset,
        s.model_cfg.image_size,
        count_parameters(s.run.model) / 1e6,
        "+".join(TASKS[t] for t in train_tasks),
        "+".join(TASKS[t] for t in val_tasks),
        s.config.task_style,
        data.train_index.size,
        data.val_index.size,
        s.device,
        describe_precision(s.device, s.config.precision),
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
        if _validation_due(config, step):
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
    x0 = s.schedule.to_model(batch["x0"].to(device, non_blocking=True))
    cond = batch["cond"].to(device, non_blocking=True) if s.model_cfg.conditioned else None
    cond = s.schedule.to_model(cond) if cond is not None else None
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


def _validation_due(config: TrainConfig, step: int) -> bool:
    """Whether step ``step`` validates: every ``val_every`` steps and at the end, from ``val_start``."""
    if not config.val_every or step < config.val_start:
        return False
    return step % config.val_every == 0 or step == config.steps


def _validation_data(s: _Session, step: int) -> tuple[ValidationSet | None, int]:
    """The validation set and seed of the validation at ``step``: the fixed ones, or with
    ``val_fresh`` the held-out slices corrupted afresh and a new seed, both from (seed, step)."""
    if not s.config.val_fresh or s.val_build is None:
        return s.val, s.val_seed
    corrupt_seed, loss_seed = np.random.SeedSequence([s.seed, 99, step]).generate_state(2)
    return s.val_build(seed=int(corrupt_seed)), int(loss_seed)


def _validate_and_check_stop(s: _Session, row: dict[str, Any]) -> None:
    """Validate (rank 0), keep the best EMA weights, and stop every rank when patience runs out."""
    run, step = s.run, s.run.step
    stop_flag = torch.zeros((), device=s.device)
    val, val_seed = _validation_data(s, step) if s.main else (None, 0)
    if val is not None and len(val):
        scores = validate(run.ema.module, val, s.config, schedule=s.schedule, device=s.device, seed=val_seed)
        row.update(scores)
        fidelity = {k: scores.get(k) for k in FIDELITY_FIELDS}
        threshold = scores.get("val_threshold")
        if run.early.update(step, scores["val_loss"], scores["val_ap"], threshold, fidelity):
            save_best_weights(s.state_dir, run)
        if run.early.should_stop(step):
            stop_flag.fill_(1.0)
        if not s.config.quiet:
            ap = scores["val_ap"]
            s.bar.write(
                f"fold {s.fold} step {step}: val_loss {scores['val_loss']:.4f}"
                + (f", val_ap {ap:.3f}" if ap is not None else "")
                + format_fidelity(scores)
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
        "init_from": run.init_from,
        "train_tasks": [TASKS[t] for t in train_tasks],
        "val_tasks": [TASKS[t] for t in val_tasks],
        "data": dict(s.summary),
        "normalisation": data.normalisation(),
        "validation": {
            "best_val_loss": early.best_val_loss,
            "best_val_loss_ma": early.best_ma,
            "best_val_ap": early.best_val_ap,
            "best_threshold": early.best_val_threshold,
            "faithful_ssim": VALIDATION_FAITHFUL_SSIM,
            "best_fidelity": early.best_fidelity,
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
    save_checkpoint(weights, model_cfg, meta, s.out_dir, schedule=s.schedule)
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
