"""What the training loop really does, step by step, on tiny synthetic slices (CPU, seconds):
the network is conditioned on the corrupted slice, the optimised loss carries the configured
Min-SNR weight, a resumed run continues at its saved step, the member is the EMA of the weights
(EMA recomputed here from the reference's formula), validation uses the fold's validation tasks,
and two DDP ranks (gloo, forked processes) keep identical weights on different data."""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import pseudohealthy.training.loop as loop
from conftest import phantom
from pseudohealthy.data.anomalies import fold_tasks
from pseudohealthy.data.dataset import CorruptedSliceDataset, HealthySlices
from pseudohealthy.data.files import atomic_write
from pseudohealthy.model.checkpoint import load_checkpoint
from pseudohealthy.training.config import TrainConfig
from pseudohealthy.training.distributed import unwrap
from pseudohealthy.training.state import LATEST, STATE_DIR

SIZE = 32
FOLD = 9  # training tasks 2, 3, 4 (deformations, intensity); validation tasks 0, 1 (Poisson)
GAMMA = 1e-3  # far from the default 1.0: almost every t is weighted, so the weight shows in the loss
LR = 1e-2  # large steps, so that the online weights and their EMA differ clearly


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_slices() -> HealthySlices:
    """Three phantom volumes, 6 foreground slices each; one volume held out."""
    images = np.concatenate(
        [np.moveaxis(phantom((SIZE, SIZE, 8), seed=v), -1, 0)[1:7] for v in range(3)]
    ).astype(np.float32)
    images /= images.max()
    data = HealthySlices(
        images=images,
        masks=images > 0,
        volume_ids=np.repeat(np.arange(3, dtype=np.int32), 6),
        slice_indices=np.tile(np.arange(1, 7, dtype=np.int32), 3),
        files=[f"vol{v}.nii.gz" for v in range(3)],
        size=SIZE,
    )
    data.split(0.3, seed=0)
    return data


def inter_sources() -> list[np.ndarray]:
    return [np.moveaxis(phantom((SIZE, SIZE, 3), seed=7), -1, 0)[1]]


def config(**kw) -> TrainConfig:
    base = dict(
        fold=FOLD, batch_size=4, val_every=0, ckpt_every=0, log_every=1, device="cpu", quiet=True,
        val_ap_samples=0, num_workers=0, lr=LR, p_none=0.0,
    )  # fmt: skip
    return TrainConfig.for_preset("tiny", **{**base, **kw})


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unwrap(model).named_parameters()}


def read_log(folder: Path) -> list[dict[str, str]]:
    with open(folder / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def state_tensors(member: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    pointer = json.loads((member / STATE_DIR / LATEST).read_text())
    info = json.loads((member / STATE_DIR / pointer["state"]).read_text())
    return info, load_file(member / STATE_DIR / info["tensors"])


def ema_of(weights: list[dict[str, torch.Tensor]], max_decay: float = 0.9999) -> dict[str, torch.Tensor]:
    """The reference's EMA: starts at the initial weights, then after step s (0-based) blends in
    the new weights with decay ``min((1 + s) / (10 + s), max_decay)``."""
    ema = {k: v.double() for k, v in weights[0].items()}
    for s, w in enumerate(weights[1:]):
        d = min((1.0 + s) / (10.0 + s), max_decay)
        ema = {k: d * ema[k] + (1.0 - d) * w[k].double() for k in ema}
    return ema


def assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    for k in b:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol), k


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in b)


class Killed(Exception):
    """A simulated kill inside a training step."""


class Spy:
    """Replaces the loop's ``training_loss``: records each call's batch, what the network was
    given, the online weights before the step, and the loss with other Min-SNR weights (from a
    copy of the loop's generator, so with the same t and noise)."""

    def __init__(self, real, fail_at: int | None = None) -> None:
        self.real, self.fail_at, self.calls = real, fail_at, []

    def __call__(self, model, x0, cond, schedule, **kw):
        if self.fail_at is not None and len(self.calls) + 1 == self.fail_at:
            raise Killed("simulated kill")
        seen: dict[str, torch.Tensor | None] = {}

        def net(x_t, t, c):
            seen["cond"] = None if c is None else c.detach().clone()
            return model(x_t, t, c)

        gen = kw["generator"]
        other = {}
        with torch.no_grad():
            for name, gamma in (("none", None), ("default", 1.0), ("configured", GAMMA)):
                copy = torch.Generator(device=gen.device)
                copy.set_state(gen.get_state())
                changed = {**kw, "generator": copy, "min_snr_gamma": gamma}
                other[name] = float(self.real(model, x0, cond, schedule, **changed))
        call = {"x0": x0.detach().clone(), "cond": cond, "schedule": schedule, "weights": params(model)}
        loss = self.real(net, x0, cond, schedule, **kw)
        call.update(net_cond=seen["cond"], loss=float(loss), other=other)
        self.calls.append(call)
        return loss


def item_spy(items: list[dict]):
    """A ``CorruptedSliceDataset.__getitem__`` that records every item it hands the loader
    (workers 0: the same process)."""
    real = CorruptedSliceDataset.__getitem__

    def getitem(dataset, key):
        item = real(dataset, key)
        items.append(item)
        return item

    return getitem


@pytest.fixture(scope="module")
def spied(tmp_path_factory):
    """A 3-step run without validation, every step recorded."""
    out = tmp_path_factory.mktemp("spied") / f"fold_{FOLD}"
    spy, items = Spy(loop.training_loss), []
    cfg = config(steps=3, min_snr_gamma=GAMMA)
    with pytest.MonkeyPatch.context() as mpatch:
        mpatch.setattr(loop, "training_loss", spy)
        mpatch.setattr(CorruptedSliceDataset, "__getitem__", item_spy(items))
        loop.train_member(synthetic_slices(), out, cfg, inter_sources=inter_sources())
    return out, cfg, spy.calls, items


def test_network_is_conditioned_on_the_corrupted_slice(spied) -> None:
    _, cfg, calls, items = spied
    first = items[: cfg.batch_size]  # the loader's first batch, in order
    cond01 = torch.stack([it["cond"] for it in first])
    x001 = torch.stack([it["x0"] for it in first])
    mask = torch.stack([it["mask"] for it in first])
    assert all(it["task"] in fold_tasks(FOLD)[0] for it in first)  # p_none = 0: every sample corrupted
    schedule = calls[0]["schedule"]
    to_model = schedule.to_model if hasattr(schedule, "to_model") else (lambda x: x * 2 - 1)
    torch.testing.assert_close(calls[0]["x0"], to_model(x001), rtol=0, atol=0)
    net_cond = calls[0]["net_cond"]
    assert net_cond is not None
    torch.testing.assert_close(net_cond, to_model(cond01), rtol=0, atol=1e-7)
    assert (net_cond - calls[0]["x0"]).abs()[mask].max() > 1e-2  # the corruption reached the network


def test_optimised_loss_carries_the_configured_min_snr_weight(spied) -> None:
    out, _, calls, _ = spied
    logged = [float(r["loss"]) for r in read_log(out)]
    assert logged == pytest.approx([c["loss"] for c in calls], rel=1e-5)  # 6 digits in log.csv
    for c in calls:
        assert c["loss"] == pytest.approx(c["other"]["configured"], rel=1e-5)
        for name in ("none", "default"):  # the weight changes the loss: the check can fail
            assert abs(c["loss"] - c["other"][name]) > 1e-3 * abs(c["other"][name]), name


def test_member_is_the_ema_of_the_online_weights(spied) -> None:
    out, _, calls, _ = spied
    _, tensors = state_tensors(out)
    final_online = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    online = [c["weights"] for c in calls] + [{k: final_online[k] for k in calls[0]["weights"]}]
    model, info = load_checkpoint(out)
    assert info["training"]["weights"] == "ema-last"
    member = dict(model.named_parameters())
    assert_close(member, ema_of(online))
    assert largest_difference(member, online[-1]) > 1e-3  # not the online weights


def test_validation_uses_the_fold_validation_tasks_and_the_ema(tmp_path, monkeypatch) -> None:
    """Validation at steps 2 and 4 (losses 1, 2: the best is step 2) sees the held-out slices
    corrupted with the fold's two validation tasks, and the EMA model; the member is step 2's EMA."""
    data = synthetic_slices()
    spy, seen = Spy(loop.training_loss), []

    def fake_validate(model, val, cfg, **kw):
        seen.append({"val": val, "weights": params(model), "calls": len(spy.calls)})
        return {"val_loss": float(len(seen)), "val_ap": 0.5, "val_threshold": 0.1}

    monkeypatch.setattr(loop, "training_loss", spy)
    monkeypatch.setattr(loop, "validate", fake_validate)
    out = tmp_path / f"fold_{FOLD}"
    loop.train_member(data, out, config(steps=4, val_every=2), inter_sources=inter_sources())
    assert [s["calls"] for s in seen] == [2, 4]
    val_tasks = fold_tasks(FOLD)[1]
    for s in seen:
        val = s["val"]
        assert tuple(val.tasks) == tuple(val_tasks)
        assert set(np.asarray(val.indices).tolist()) <= set(data.val_index.tolist()) and len(val) > 0
        assert set(np.asarray(val.task).tolist()) <= {-1, *val_tasks}
        assert (np.asarray(val.task) >= 0).any() and not np.array_equal(val.cond, val.x0)
    online = [c["weights"] for c in spy.calls]  # before steps 1..4: after steps 0..3
    _, tensors = state_tensors(out)
    online.append({k: tensors[f"model.{k}"] for k in online[0]})
    ema2 = ema_of(online[:3])
    assert_close(seen[0]["weights"], ema2)  # validation scores the EMA...
    assert largest_difference(seen[0]["weights"], online[2]) > 1e-3  # ...not the online model
    assert_close(seen[1]["weights"], ema_of(online))
    model, info = load_checkpoint(out)
    assert info["training"]["weights"] == "ema-best" and info["validation"]["best_step"] == 2
    assert_close(dict(model.named_parameters()), ema2)


def test_resume_continues_at_the_saved_step(tmp_path, monkeypatch) -> None:
    data, cfg = synthetic_slices(), config(steps=6, ckpt_every=3)
    member = tmp_path / "killed" / f"fold_{FOLD}"
    killed = Spy(loop.training_loss, fail_at=5)  # killed in step 5, after the state of step 3
    monkeypatch.setattr(loop, "training_loss", killed)
    with pytest.raises(Killed):
        loop.train_member(data, member, cfg, inter_sources=inter_sources())
    assert json.loads((member / STATE_DIR / LATEST).read_text())["step"] == 3
    resumed = Spy(killed.real)
    monkeypatch.setattr(loop, "training_loss", resumed)
    loop.train_member(data, member, cfg, resume=True, inter_sources=inter_sources())
    assert len(resumed.calls) == 3  # steps 4, 5 and 6 only
    straight_dir = tmp_path / "straight" / f"fold_{FOLD}"
    straight = Spy(killed.real)
    monkeypatch.setattr(loop, "training_loss", straight)
    loop.train_member(data, straight_dir, cfg, inter_sources=inter_sources())
    assert [c["loss"] for c in resumed.calls] == pytest.approx(
        [c["loss"] for c in straight.calls[3:]], abs=1e-7
    )
    assert [r["step"] for r in read_log(member)] == [str(s) for s in range(1, 7)]
    info, tensors = state_tensors(member)
    assert info["step"] == 6 and load_checkpoint(member)[1]["training"]["steps_done"] == 6
    assert_close(tensors, state_tensors(straight_dir)[1], atol=1e-7)


def test_resume_extends_a_finished_member_to_more_steps(tmp_path, monkeypatch) -> None:
    data = synthetic_slices()
    member = tmp_path / "short" / f"fold_{FOLD}"
    loop.train_member(data, member, config(steps=3, ckpt_every=3), inter_sources=inter_sources())
    assert load_checkpoint(member)[1]["training"]["steps_done"] == 3
    again = Spy(loop.training_loss)
    monkeypatch.setattr(loop, "training_loss", again)
    loop.train_member(data, member, config(steps=3, ckpt_every=3), resume=True, inter_sources=inter_sources())
    assert again.calls == []  # finished at its steps: skipped
    loop.train_member(data, member, config(steps=6, ckpt_every=3), resume=True, inter_sources=inter_sources())
    assert len(again.calls) == 3  # steps 4, 5 and 6 only
    straight_dir = tmp_path / "straight" / f"fold_{FOLD}"
    straight = Spy(again.real)
    monkeypatch.setattr(loop, "training_loss", straight)
    loop.train_member(data, straight_dir, config(steps=6, ckpt_every=3), inter_sources=inter_sources())
    expected = [c["loss"] for c in straight.calls[3:]]
    assert [c["loss"] for c in again.calls] == pytest.approx(expected, abs=1e-7)
    assert [r["step"] for r in read_log(member)] == [str(s) for s in range(1, 7)]
    assert load_checkpoint(member)[1]["training"]["steps_done"] == 6
    assert_close(state_tensors(member)[1], state_tensors(straight_dir)[1], atol=1e-7)


# --------------------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_worker(rank: int, out: str, port: int) -> None:
    """One rank of a 2-process gloo run: trains 3 steps and saves what each step saw."""
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    spy = Spy(loop.training_loss)
    loop.training_loss = spy
    try:
        loop.train_member(synthetic_slices(), Path(out) / "member", config(steps=3, batch_size=2),
                          inter_sources=inter_sources())  # fmt: skip
    finally:
        loop.training_loss = spy.real
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    tensors = {}
    for i, call in enumerate(spy.calls):
        tensors[f"x0.{i}"] = call["x0"].contiguous()
        tensors.update({f"w.{i}.{k}": v.contiguous() for k, v in call["weights"].items()})
    atomic_write(Path(out) / f"rank{rank}.safetensors", lambda tmp: save_file(tensors, tmp))


def test_ddp_ranks_keep_identical_weights_on_different_data(tmp_path) -> None:
    # fork, not spawn: the children need not import torch and the project again (~1 min on 2 busy
    # cores); safe here as the parent has run no CUDA and uses one intra-op thread
    mp.start_processes(_ddp_worker, args=(str(tmp_path), _free_port()), nprocs=2, start_method="fork")
    r0, r1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    for i in range(3):
        assert not torch.equal(r0[f"x0.{i}"], r1[f"x0.{i}"])  # each rank trains on its own batch
    names = [k for k in r0 if k.startswith("w.")]
    assert names and all(torch.equal(r0[k], r1[k]) for k in names)  # gradients averaged: same steps
    moved = [k for k in names if k.startswith("w.2.") and not torch.equal(r0[k], r0["w.0." + k[4:]])]
    assert moved  # the weights did change
    assert load_checkpoint(tmp_path / "member")[1]["training"]["world_size"] == 2
