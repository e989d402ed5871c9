"""Training options: the prediction target, zero terminal SNR and model range reach the loss,
validation and the saved member; initial weights (shared seed, another member's); the validation
protocol (start step, fresh corruptions); resume refuses changed settings; the CLI flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pseudohealthy.cli import build_parser, main
from pseudohealthy.data.dataset import HealthySlices, collect_training_scans
from pseudohealthy.data.preprocess import NORMS
from pseudohealthy.model.checkpoint import Member, load_checkpoint
from pseudohealthy.model.diffusion import Schedule
from pseudohealthy.training.config import PRESET_TRAINING, TrainConfig, TrainError
from pseudohealthy.training.loop import initial_network, train_member
from pseudohealthy.training.state import LATEST, STATE_DIR, read_saved_config

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ixi_dir(tmp_path_factory, shared_data) -> Path:
    """Two real IXI T1 volumes, 8 axial slices each."""
    out = tmp_path_factory.mktemp("ixi")
    for src in sorted((shared_data / "healthy/ixi_t1").glob("IXI2*_T1.nii.gz"))[:2]:
        img = nib.as_closest_canonical(nib.load(src)).slicer[:, :, 58:66]
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine), out / src.name)
    return out


@pytest.fixture(scope="module")
def slices(ixi_dir) -> HealthySlices:
    return HealthySlices.from_scans(collect_training_scans([ixi_dir]), size=SIZE, seed=0, val_fraction=0.2)


def tiny(**kw) -> TrainConfig:
    base = dict(batch_size=2, val_every=0, ckpt_every=0, log_every=1, device="cpu", quiet=True)
    return TrainConfig.for_preset("tiny", **{**base, "val_ap_samples": 2, "val_ap_steps": 2, **kw})


def state_tensors(member: Path) -> dict[str, torch.Tensor]:
    pointer = json.loads((member / STATE_DIR / LATEST).read_text())
    state = json.loads((member / STATE_DIR / pointer["state"]).read_text())
    return load_file(member / STATE_DIR / state["tensors"])


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


# ----------------------------------------------------------------- prediction, zero SNR, range


def oracle_target(prediction: str, x0: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The exact network output for ``prediction`` (Salimans & Ho 2022 for v), from x0 and x_t."""
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    eps = (x_t - a * x0) / s
    return {"epsilon": eps, "v": a * eps - s * x0, "sample": x0}[prediction]


@pytest.mark.parametrize(
    ("prediction", "zero_snr", "centred"),
    [("v", True, False), ("sample", False, True), ("epsilon", False, False)],
)
def test_loss_validation_and_member_use_the_requested_schedule(
    slices, tmp_path, monkeypatch, prediction, zero_snr, centred
):
    import pseudohealthy.training.loop as loop

    seen_loss, seen_val = [], []
    real_loss, real_validate = loop.training_loss, loop.validate

    def spy_loss(model, x0, cond, schedule, **kw):
        seen_loss.append((schedule, x0.detach().clone(), None if cond is None else cond.detach().clone()))
        return real_loss(model, x0, cond, schedule, **kw)

    def spy_validate(model, val, config, *, schedule, **kw):
        seen_val.append(schedule)
        return real_validate(model, val, config, schedule=schedule, **kw)

    monkeypatch.setattr(loop, "training_loss", spy_loss)
    monkeypatch.setattr(loop, "validate", spy_validate)
    config = tiny(steps=2, val_every=2, prediction=prediction, zero_snr=zero_snr, centred=centred)
    out = train_member(slices, tmp_path / "m", config)

    expected = Schedule(prediction=prediction, zero_snr=zero_snr, centred=centred)
    assert Member.from_dir(out).schedule == expected
    info = json.loads((out / "pseudohealthy.json").read_text())
    assert {k: info["schedule"][k] for k in ("prediction", "zero_snr", "centred")} == {
        "prediction": prediction,
        "zero_snr": zero_snr,
        "centred": centred,
    }
    assert len(seen_loss) == 2 and all(s == expected for s, _, _ in seen_loss)
    assert seen_val and all(s == expected for s in seen_val)
    if zero_snr:  # the last step carries no signal
        assert seen_loss[0][0].abar(expected.T - 1) == pytest.approx(0.0, abs=1e-12)

    # the batches are in the requested model range: [0, 1], or [-1, 1] with the background at -1
    schedule, x0, cond = seen_loss[0]
    assert (float(x0.min()) < -0.5) == centred and float(x0.max()) <= 1.0
    # the loss's target is the prediction's: an oracle of that prediction scores 0, the others not
    abar = torch.tensor([schedule.abar(t) for t in (100, 500, 900, 990)], dtype=torch.float32)
    t = torch.tensor([100, 500, 900, 990])
    xb, cb = x0[:1].repeat(4, 1, 1, 1), cond[:1].repeat(4, 1, 1, 1)
    for other in ("epsilon", "v", "sample"):

        def oracle(x_t, t_, c, other=other):
            return oracle_target(other, xb, x_t, abar)

        loss = float(
            real_loss(oracle, xb, cb, schedule, t=t, min_snr_gamma=None, generator=torch.Generator())
        )
        assert (loss < 1e-8) == (other == prediction), (other, loss)


def test_zero_snr_with_epsilon_is_refused(slices, tmp_path, ixi_dir, capsys):
    with pytest.raises(TrainError, match=r"zero_snr.*'v' or 'sample'"):
        train_member(slices, tmp_path / "m", tiny(steps=1, zero_snr=True))
    assert not (tmp_path / "m").exists()
    args = [ixi_dir, "-o", tmp_path / "run", "--fold", "0", "--preset", "tiny", "--device", "cpu"]
    assert main(["-q", "train", *map(str, args), "--zero-snr"]) == 2
    err = capsys.readouterr().err.strip()
    assert "zero_snr" in err and "\n" not in err


# ----------------------------------------------------------------- initial weights


def test_folds_share_initial_weights_unless_their_seeds_differ(slices, tmp_path):
    # lr 1e-12: one step moves no weight by more than ~1e-11, so the step-1 state is the start
    runs = iter(range(100))

    def start(fold: int, **kw) -> dict[str, torch.Tensor]:
        out = tmp_path / f"run{next(runs)}"
        train_member(slices, out, tiny(steps=2, ckpt_every=1, lr=1e-12, fold=fold, **kw))
        return prefixed(state_tensors(out), "model.")

    shared = max_difference(start(0), start(1))
    assert shared < 1e-8
    assert max_difference(start(0, init_seed=1), start(1, init_seed=2)) > 1e-3
    assert max_difference(start(0, init_seed=None), start(1, init_seed=None)) > 1e-3
    # the same rule outside the loop: initial_network is what the loop starts from
    a, _ = initial_network(tiny(fold=3))
    b, _ = initial_network(tiny(fold=8, seed=5))
    assert max_difference(a.state_dict(), b.state_dict()) == 0.0


def test_init_from_starts_from_the_members_weights(slices, tmp_path):
    source = train_member(slices, tmp_path / "src", tiny(steps=3, fold=2, val_every=3))
    source_weights = load_checkpoint(source)[0].state_dict()
    source_info = json.loads((source / "pseudohealthy.json").read_text())

    net, record = initial_network(tiny(init_from=str(source)))
    assert max_difference(net.state_dict(), source_weights) == 0.0
    assert record == {
        "path": str(source),
        "fold": 2,
        "train_tasks": source_info["train_tasks"],
        "step": source_info["validation"]["best_step"],
    }
    # through the loop: after one step at lr 1e-12 the model and the EMA are still the source's
    out = train_member(slices, tmp_path / "ft", tiny(steps=2, ckpt_every=1, lr=1e-12, init_from=str(source)))
    tensors = state_tensors(out)
    assert max_difference(prefixed(tensors, "model."), source_weights) < 1e-8
    assert max_difference(prefixed(tensors, "ema."), source_weights) < 1e-8
    info = json.loads((out / "pseudohealthy.json").read_text())
    assert info["init_from"] == record and info["training"]["init_from"] == str(source)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"model_overrides": {"num_res_blocks": 2}}, "model.num_res_blocks"),
        ({"prediction": "v"}, "schedule.prediction"),
        ({"centred": True}, "schedule.centred"),
    ],
)
def test_init_from_refuses_another_architecture_or_schedule(slices, tmp_path, change, field):
    source = train_member(slices, tmp_path / "src", tiny(steps=1))
    with pytest.raises(TrainError, match=f"its {field} is") as caught:
        train_member(slices, tmp_path / "ft", tiny(steps=1, init_from=str(source), **change))
    assert str(source) in str(caught.value)
    assert not (tmp_path / "ft" / "pseudohealthy.json").exists()


# ----------------------------------------------------------------- validation protocol


def test_preset_validation_protocol():
    paper, cpu = TrainConfig.for_preset("paper"), TrainConfig.for_preset("cpu")
    assert (paper.val_start, paper.val_max_slices, paper.val_fresh) == (5000, None, True)
    assert (cpu.val_start, cpu.val_fresh) == (0, False) and cpu.val_max_slices is not None
    assert TrainConfig.for_preset("tiny-baseline").val_start == PRESET_TRAINING["tiny"]["val_start"]
    assert paper.init_seed == cpu.init_seed == 42


def test_val_start_delays_validation_and_val_fresh_corrupts_afresh(slices, tmp_path, monkeypatch):
    import pseudohealthy.training.loop as loop

    real, seeds = loop.build_validation, []

    def spy(*args, seed, **kw):
        seeds.append(seed)
        return real(*args, seed=seed, **kw)

    monkeypatch.setattr(loop, "build_validation", spy)
    fixed = train_member(slices, tmp_path / "fixed", tiny(steps=6, val_every=2, val_start=3))
    rows = (fixed / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    validated = [r.split(",")[0] for r in rows[1:] if r.split(",")[header.index("val_loss")]]
    assert validated == ["4", "6"]
    assert len(seeds) == 1  # one fixed validation set

    seeds.clear()
    fresh = train_member(slices, tmp_path / "fresh", tiny(steps=6, val_every=2, val_fresh=True))
    assert len(seeds) == 3 and len(set(seeds)) == 3  # steps 2, 4, 6: each its own corruptions
    val = json.loads((fresh / "pseudohealthy.json").read_text())["validation"]
    assert math.isfinite(val["best_val_loss"])


# ----------------------------------------------------------------- resume


def interrupted(slices, folder: Path, **kw) -> Path:
    """A member whose run stopped after its step-2 state (the member files removed)."""
    out = train_member(slices, folder, tiny(steps=2, ckpt_every=2, **kw))
    (out / "pseudohealthy.json").unlink()
    (out / "model.safetensors").unlink()
    return out


@pytest.mark.parametrize(
    ("start", "change", "name"),
    [
        ({}, {"prediction": "v"}, "prediction"),
        ({"prediction": "v"}, {"prediction": "v", "zero_snr": True}, "zero_snr"),
        ({}, {"centred": True}, "centred"),
        ({}, {"init_seed": 7}, "init_seed"),
    ],
)
def test_resume_refuses_changed_diffusion_settings(slices, tmp_path, start, change, name):
    out = interrupted(slices, tmp_path / "m", **start)
    with pytest.raises(TrainError, match=f"cannot resume with {name}="):
        train_member(slices, out, tiny(steps=4, ckpt_every=2, **change), resume=True)
    assert train_member(slices, out, tiny(steps=4, ckpt_every=2, **start), resume=True) == out


def test_a_state_saved_before_the_settings_existed_resumes_as_centred_epsilon(slices, tmp_path):
    out = interrupted(slices, tmp_path / "m", centred=True, init_seed=None)
    pointer = json.loads((out / STATE_DIR / LATEST).read_text())
    path = out / STATE_DIR / pointer["state"]
    state = json.loads(path.read_text())
    for key in ("prediction", "zero_snr", "centred", "init_seed", "init_from", "val_fresh", "val_start"):
        state["config"].pop(key)
    path.write_text(json.dumps(state))
    saved = read_saved_config(out)
    assert (saved["prediction"], saved["zero_snr"], saved["centred"], saved["init_seed"]) == (
        "epsilon",
        False,
        True,
        None,
    )
    with pytest.raises(TrainError, match="cannot resume with centred=False; the run was started with True"):
        train_member(slices, out, tiny(steps=4, ckpt_every=2), resume=True)
    train_member(slices, out, tiny(steps=4, ckpt_every=2, centred=True, init_seed=None), resume=True)
    assert Member.from_dir(out).schedule.centred is True


# ----------------------------------------------------------------- command line


def test_cli_parses_the_new_flags():
    args = build_parser().parse_args(
        [
            *("train", "d", "-o", "r", "--prediction", "v", "--zero-snr", "--centred", "--init-from", "m"),
            *("--init-seed", "fold", "--val-start", "100", "--no-val-fresh"),
        ]
    )
    assert (args.prediction, args.zero_snr, args.centred, args.init_from) == ("v", True, True, Path("m"))
    assert (args.init_seed, args.val_start, args.val_fresh) == ("fold", 100, False)
    plain = build_parser().parse_args(["train", "d", "-o", "r", "--init-seed", "7"])
    assert (plain.prediction, plain.zero_snr, plain.centred, plain.init_from) == (None, None, None, None)
    assert (plain.init_seed, plain.val_start, plain.val_fresh) == (7, None, None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "d", "-o", "r", "--init-seed", "x"])
    parse = build_parser().parse_args
    assert [parse(["train", "d", "-o", "r", "--norm", n]).norm for n in NORMS] == list(NORMS)
    with pytest.raises(TrainError, match=r"normalisation 'zscore' \(use one of max, percentile, median"):
        TrainConfig.for_preset("tiny", norm="zscore").validate()


def test_cli_trains_with_the_new_flags(ixi_dir, tmp_path, capsys):
    common = [ixi_dir, "--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--steps", "2"]
    run = tmp_path / "run"
    flags = ["--prediction", "sample", "--zero-snr", "--init-seed", "fold", "--val-every", "1"]
    flags += ["--norm", "median"]
    assert (
        main(["-q", "train", *map(str, [*common, "-o", run, "--fold", "1", *flags, "--val-start", "2"])]) == 0
    )
    info = json.loads((run / "fold_1" / "pseudohealthy.json").read_text())
    assert info["schedule"]["prediction"] == "sample" and info["schedule"]["zero_snr"] is True
    assert info["schedule"]["centred"] is False  # the reference's [0, 1]
    assert info["normalisation"]["method"] == "median"  # what a restoration repeats
    assert info["training"]["init_seed"] is None and info["training"]["val_start"] == 2
    assert info["validation"]["best_step"] == 2  # no validation at step 1
    # --init-from: the member's weights, recorded; another architecture is refused before the data load
    ft = tmp_path / "ft"
    assert main(["-q", "train", *map(str, [*common, "-o", ft, "--fold", "0", "--prediction", "sample"]),
                 "--init-from", str(run / "fold_1")]) == 0  # fmt: skip
    record = json.loads((ft / "fold_0" / "pseudohealthy.json").read_text())["init_from"]
    assert record["path"] == str((run / "fold_1").resolve()) and record["fold"] == 1
    capsys.readouterr()
    bad = [*common, "-o", tmp_path / "bad", "--fold", "0", "--init-from", run / "fold_1"]
    assert main(["-q", "train", *map(str, bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "schedule.prediction" in err and "\n" not in err
