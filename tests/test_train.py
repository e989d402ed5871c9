"""Training: the loss falls on real slices, members load, kill-and-resume ends where an
uninterrupted run does, torchrun (DDP, gloo) works, the CLI reports errors in one line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pseudohealthy.cli import main
from pseudohealthy.data.dataset import HealthySlices, collect_training_scans
from pseudohealthy.data.io import load_scan
from pseudohealthy.model.checkpoint import Ensemble, load_checkpoint
from pseudohealthy.model.ema import EMA, ema_decay
from pseudohealthy.training.config import TrainConfig, TrainError
from pseudohealthy.training.logs import EarlyStop
from pseudohealthy.training.loop import train_member
from pseudohealthy.training.state import LATEST, STATE_DIR

SIZE = 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: same numerics as the OMP_NUM_THREADS=1 subprocesses, robust on 2 busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ixi_dir(tmp_path_factory, shared_data) -> Path:
    """Three real IXI T1 volumes, 12 axial slices each (canonical orientation)."""
    out = tmp_path_factory.mktemp("ixi")
    for src in sorted((shared_data / "healthy/ixi_t1").glob("IXI2*_T1.nii.gz"))[:3]:
        img = nib.as_closest_canonical(nib.load(src)).slicer[:, :, 55:67]
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine), out / src.name)
    return out


@pytest.fixture(scope="module")
def slices(ixi_dir) -> HealthySlices:
    return HealthySlices.from_scans(collect_training_scans([ixi_dir]), size=SIZE, seed=0)


def tiny_config(**kw) -> TrainConfig:
    base = dict(
        batch_size=4, val_every=0, ckpt_every=0, log_every=1, device="cpu", quiet=True, val_ap_samples=4
    )
    return TrainConfig.for_preset("tiny", **{**base, **kw})


def read_log(folder: Path) -> list[dict[str, str]]:
    with open(folder / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def cli(*argv) -> int:
    return main(["-q", "train", *map(str, argv)])


def test_ema_decay_warm_up():
    assert ema_decay(0) == pytest.approx(0.1)
    assert ema_decay(90) == pytest.approx(0.91)
    assert ema_decay(10**7) == 0.9999
    model = torch.nn.Linear(2, 1)
    ema = EMA(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    before = ema.module.weight.clone()
    ema.update(model, 0)  # decay 0.1: 90% of the way to the model
    assert torch.allclose(ema.module.weight, 0.1 * before + 0.9)
    assert not ema.module.weight.requires_grad


def test_early_stop_tracks_moving_average():
    early = EarlyStop(patience=3)
    assert early.update(1, 1.0, 0.5)  # first value is the best
    assert early.update(2, 0.5, 0.6) and early.ma == pytest.approx(0.95)
    assert not early.update(3, 2.0, 0.1)  # ma rises: not the best
    assert early.best_step == 2 and early.best_val_loss == 0.5 and early.best_val_ap == 0.6
    assert not early.should_stop(4) and early.should_stop(5)


def test_loss_falls_on_real_slices(slices, tmp_path):
    out = train_member(slices, tmp_path / "fold_0", tiny_config(steps=50, lr=1e-3, fold=0))
    losses = np.array([float(r["loss"]) for r in read_log(out)])
    assert losses.size == 50 and np.isfinite(losses).all()
    first, last = losses[:10].mean(), losses[-10:].mean()
    assert last < 0.6 * first, (first, last)


def test_member_loads_with_metadata(slices, tmp_path):
    config = tiny_config(steps=6, val_every=3, ckpt_every=3, fold=4, modality="T1")
    out = train_member(slices, tmp_path / "run" / "fold_4", config)
    model, info = load_checkpoint(out)
    assert info["image_size"] == SIZE and info["model"]["channels"] == [8, 16]
    assert info["modality"] == "T1" and info["fold"] == 4
    assert info["train_tasks"] == ["poisson_intra", "sink", "intensity"]  # fold 4: tasks 0, 2, 4
    assert info["val_tasks"] == ["poisson_inter", "source"]
    assert info["data"]["n_slices"] == len(slices) and info["data"]["n_volumes"] == 3
    assert len(info["data"]["files"]) == 3
    assert info["normalisation"]["method"] == "max" and info["normalisation"]["size"] == SIZE
    first = load_scan(info["data"]["files"][0])  # the training slices' field of view, recorded
    side = max(first.shape[:2]) * float(np.mean(first.spacing[:2]))
    assert info["normalisation"]["fov_mm"] == pytest.approx(side) == slices.fov_mm
    val = info["validation"]
    assert val["best_step"] in (3, 6) and val["best_val_loss"] > 0 and 0 <= val["val_ap"] <= 1
    assert info["training"]["steps_done"] == 6 and info["training"]["weights"] == "ema-best"
    assert info["training"]["lr"] == config.lr and info["training"]["time_s"] > 0
    rows = read_log(out)
    assert [r["step"] for r in rows if r["val_loss"]] == ["3", "6"]
    # the member is the best EMA weights, not the raw model
    best = load_file(out / STATE_DIR / f"best_ema_{val['best_step']:08d}.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best[name])
    assert Ensemble.from_dir(out.parent).names == ["fold_4"]
    # the resumable state is safetensors + JSON (no pickle), and a finished member is not retrained
    pointer = json.loads((out / STATE_DIR / LATEST).read_text())
    state = json.loads((out / STATE_DIR / pointer["state"]).read_text())
    tensors = load_file(out / STATE_DIR / state["tensors"])
    assert any(k.startswith("optimizer.") for k in tensors) and any(k.startswith("ema.") for k in tensors)
    assert state["step"] == 6 and len(state["rng"]["generators"]) == 1
    with pytest.raises(TrainError, match="already"):
        train_member(slices, out, config)
    assert train_member(slices, out, config, resume=True) == out


def test_best_validation_threshold_is_recorded(slices, tmp_path, monkeypatch):
    out = train_member(slices, tmp_path / "plain", tiny_config(steps=2, val_every=1))
    assert "best_threshold" in load_checkpoint(out)[1]["validation"]  # None until validate gives one
    # moving averages 0.5, 0.49, 0.531, 0.5679: the best validation is step 2's
    scores = iter([(0.5, 0.1), (0.4, 0.2), (0.9, 0.3), (0.9, 0.4)])

    def fake_validate(*args, **kwargs):
        loss, threshold = next(scores)
        return {"val_loss": loss, "val_ap": 0.5, "val_threshold": threshold}

    monkeypatch.setattr("pseudohealthy.training.loop.validate", fake_validate)
    out = train_member(slices, tmp_path / "fake", tiny_config(steps=4, val_every=1, ckpt_every=2))
    val = load_checkpoint(out)[1]["validation"]
    assert val["best_step"] == 2 and val["best_threshold"] == pytest.approx(0.2)
    pointer = json.loads((out / STATE_DIR / LATEST).read_text())
    state = json.loads((out / STATE_DIR / pointer["state"]).read_text())
    assert state["early_stop"]["best_val_threshold"] == pytest.approx(0.2)  # kept for a resume
    # a state written before thresholds were recorded still resumes
    old = {k: v for k, v in state["early_stop"].items() if k != "best_val_threshold"}
    assert EarlyStop.from_dict(old, patience=0).best_val_threshold is None


def _state_tensors(member: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((member / STATE_DIR / LATEST).read_text())
    state = json.loads((member / STATE_DIR / pointer["state"]).read_text())
    return load_file(member / STATE_DIR / state["tensors"])


def test_kill_and_resume_ends_like_an_uninterrupted_run(ixi_dir, tmp_path):
    common = [ixi_dir, "--fold", "1", "--device", "cpu", "--workers", "0", "--seed", "3"]
    settings = ["--preset", "tiny", "--steps", "12", "--ckpt-every", "4", "--val-every", "4"]
    settings += ["--batch-size", "4", "--log-every", "1"]
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pseudohealthy", "-q", "train", *map(str, common), "-o", str(killed)]
    proc = subprocess.Popen(
        [*cmd, *settings, "--step-delay", "0.4"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = killed / "fold_1" / STATE_DIR / "state_00000008.json"
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no step-8 checkpoint"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    member = killed / "fold_1"
    assert not (member / "pseudohealthy.json").exists()  # really interrupted
    assert json.loads((member / STATE_DIR / LATEST).read_text())["step"] < 12
    # resuming without --resume is refused; with it, the saved settings are reused
    assert cli(*common, "-o", killed) == 2
    assert cli(*common, "-o", killed, "--resume") == 0
    straight = tmp_path / "straight"
    assert cli(*common, *settings, "-o", straight) == 0

    # the member (best EMA weights) and the final state (model, EMA, optimiser) agree
    a, b = load_file(member / "model.safetensors"), load_file(straight / "fold_1" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-7), key
    a, b = _state_tensors(member), _state_tensors(straight / "fold_1")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=1e-7), key
    rows_a, rows_b = read_log(member), read_log(straight / "fold_1")
    assert [r["step"] for r in rows_a] == [str(s) for s in range(1, 13)]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert (ra["loss"], ra["val_loss"], ra["val_ap"]) == (rb["loss"], rb["val_loss"], rb["val_ap"])
    info_a = json.loads((member / "pseudohealthy.json").read_text())
    info_b = json.loads((straight / "fold_1" / "pseudohealthy.json").read_text())
    assert info_a["validation"] == info_b["validation"]


def test_cli_trains_a_subset_of_folds(ixi_dir, tmp_path):
    run = tmp_path / "run"
    args = [ixi_dir, "-o", run, "--folds", "2,7", "--preset", "tiny", "--steps", "2", "--device", "cpu"]
    assert cli(*args, "--batch-size", "2", "--val-every", "0", "--modality", "T1") == 0
    ensemble = Ensemble.from_dir(run)
    assert ensemble.names == ["fold_2", "fold_7"]
    assert [m.info["fold"] for m in ensemble] == [2, 7]
    assert ensemble[1].info["train_tasks"] == ["poisson_inter", "sink", "intensity"]
    assert ensemble[0].info["training"]["weights"] == "ema-last"  # no validation: the last EMA


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fold", "10"], "--fold must be 0-9"),
        (["--folds", "1,x"], "--folds must be"),
        (["--preset", "huge"], "unknown model preset"),
        (["--steps", "0"], "steps must be at least 1"),
    ],
)
def test_cli_errors_are_one_line(ixi_dir, tmp_path, capsys, extra, message):
    assert cli(ixi_dir, "-o", tmp_path / "run", "--device", "cpu", "--preset", "tiny", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("pseudohealthy train: error:")


def test_cli_no_scans_found(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(tmp_path / "empty", "-o", tmp_path / "run", "--device", "cpu") == 2
    assert "no NIfTI scans found" in capsys.readouterr().err


def test_torchrun_two_processes_on_cpu(ixi_dir, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "pseudohealthy", "-q", "train", str(ixi_dir), "-o", str(run), "--fold", "0"]
    cmd += ["--preset", "tiny", "--steps", "3", "--batch-size", "2", "--val-every", "2", "--ckpt-every", "2"]
    cmd += ["--log-every", "1", "--device", "cpu", "--workers", "0"]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    member = run / "fold_0"
    _, info = load_checkpoint(member)
    assert info["training"]["world_size"] == 2 and info["training"]["steps_done"] == 3
    assert [r["step"] for r in read_log(member)] == ["1", "2", "3"]  # only rank 0 writes
    pointer = json.loads((member / STATE_DIR / LATEST).read_text())
    state = json.loads((member / STATE_DIR / pointer["state"]).read_text())
    gens = state["rng"]["generators"]
    assert len(gens) == 2 and gens[0] != gens[1]  # each rank draws its own noise


def test_cuda_out_of_memory_stops_with_the_batch_size_to_try(slices, tmp_path, monkeypatch):
    import pseudohealthy.training.loop as loop

    real, calls = loop.training_loss, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # step 5: after the checkpoint of step 4
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    config = tiny_config(steps=6, ckpt_every=2, fold=2)
    member = tmp_path / "fold_2"
    monkeypatch.setattr(loop, "training_loss", flaky)
    with pytest.raises(TrainError) as caught:
        train_member(slices, member, config)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("out of GPU memory at batch size 4 (step 5 on cpu)")
    assert "try --batch-size 2" in message and "the state of step 4 stays resumable" in message
    assert not (member / "pseudohealthy.json").exists()
    assert json.loads((member / STATE_DIR / LATEST).read_text())["step"] == 4  # untouched by the failure
    monkeypatch.setattr(loop, "training_loss", real)
    assert train_member(slices, member, config, resume=True) == member
    _, info = load_checkpoint(member)
    assert info["training"]["steps_done"] == 6
    assert [r["step"] for r in read_log(member)] == [str(s) for s in range(1, 7)]
