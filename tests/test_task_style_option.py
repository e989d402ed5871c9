"""`--task-style` of `pseudohealthy train` and `pseudohealthy synth`: the flag reaches TrainConfig,
the training and validation corrupters, the member's JSON and synth's tasks; unknown styles and a
resume with another style are refused; legacy synth output differs from the reference's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pseudohealthy.data.anomalies.scan as scan_module
import pseudohealthy.data.dataset as dataset_module
from conftest import phantom
from pseudohealthy.cli import build_parser, main
from pseudohealthy.cli import train as train_cli
from pseudohealthy.data.anomalies import DEFAULT_STYLE, STYLES, TASKS, fold_tasks
from pseudohealthy.model.checkpoint import load_checkpoint
from pseudohealthy.training.config import MUST_MATCH, TrainConfig, TrainError
from pseudohealthy.training.loop import train_member
from pseudohealthy.training.state import LATEST, STATE_DIR, read_saved_config
from test_train_options import interrupted, tiny
from test_training_loop import _one_thread, synthetic_slices  # noqa: F401  (_one_thread: autouse)

LEGACY = "legacy"
assert LEGACY in STYLES and LEGACY != DEFAULT_STYLE


def corrupter_spy(monkeypatch) -> list[tuple[tuple[int, ...], str]]:
    """``(tasks, style)`` of every Corruptor the training data set and validation set build."""
    built: list[tuple[tuple[int, ...], str]] = []
    real = dataset_module.Corruptor

    class Recording(real):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            built.append((tuple(self.tasks), self.style))

    monkeypatch.setattr(dataset_module, "Corruptor", Recording)
    return built


def scans(folder: Path, n: int = 3) -> Path:
    """``n`` phantom volumes (32 x 32 x 12) in ``folder``."""
    folder.mkdir(parents=True)
    for v in range(n):
        nib.save(nib.Nifti1Image(phantom(seed=v), np.eye(4)), folder / f"vol{v}.nii.gz")
    return folder


# ----------------------------------------------------------------- train


def test_the_style_is_a_resume_setting_with_reference_for_older_states():
    assert "task_style" in MUST_MATCH
    assert TrainConfig().task_style == DEFAULT_STYLE == TrainConfig.for_preset("tiny").task_style
    assert TrainConfig(task_style=LEGACY).to_dict()["task_style"] == LEGACY


def test_train_flag_reaches_the_config_the_corrupters_and_the_member(tmp_path, monkeypatch):
    built = corrupter_spy(monkeypatch)
    run = tmp_path / "run"
    argv = [scans(tmp_path / "data"), "-o", run, "--fold", "9", "--preset", "tiny", "--size", "32"]
    argv += ["--device", "cpu", "--batch-size", "2", "--steps", "2", "--val-every", "2"]
    argv += ["--val-fraction", "0.3", "--task-style", LEGACY]
    assert main(["-q", "train", *map(str, argv)]) == 0
    train_tasks, val_tasks = fold_tasks(9)
    assert built == [(train_tasks, LEGACY), (val_tasks, LEGACY)]  # training data, then validation
    info = json.loads((run / "fold_9" / "pseudohealthy.json").read_text())
    assert info["training"]["task_style"] == LEGACY
    assert info["validation"]["best_step"] == 2  # the validation set was built and used
    assert load_checkpoint(run / "fold_9")[1]["training"]["task_style"] == LEGACY


def test_train_flag_default_and_resume(tmp_path):
    def config(*extra: str, resume: bool = False) -> TrainConfig:
        argv = ["train", "d", "-o", str(tmp_path / "run"), "--preset", "tiny", *extra]
        args = build_parser().parse_args(argv + (["--resume"] if resume else []))
        return train_cli._config(args, [0], "cpu")

    assert config().task_style == DEFAULT_STYLE
    assert config("--task-style", LEGACY).task_style == LEGACY
    # --resume without the flag keeps the style of the run being resumed; the flag still wins
    interrupted(synthetic_slices(), tmp_path / "run" / "fold_0", task_style=LEGACY)
    assert config(resume=True).task_style == LEGACY
    assert config("--task-style", DEFAULT_STYLE, resume=True).task_style == DEFAULT_STYLE


def test_an_unknown_style_is_refused(tmp_path, capsys):
    choices = ", ".join(STYLES)
    with pytest.raises(TrainError, match=f"unknown task style 'fancy'; choose one of {choices}$"):
        TrainConfig.for_preset("tiny", task_style="fancy").validate()
    with pytest.raises(TrainError, match="unknown task style"):
        train_member(synthetic_slices(), tmp_path / "m", tiny(steps=1, task_style="fancy"))
    assert not (tmp_path / "m").exists()
    for command in (["train", "d", "-o", "r"], ["synth", "s.nii.gz", "-o", "o"]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--task-style", "fancy"])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert "--task-style: invalid choice: 'fancy'" in err
        assert all(repr(style) in err for style in STYLES)


@pytest.mark.parametrize(("start", "change"), [(DEFAULT_STYLE, LEGACY), (LEGACY, DEFAULT_STYLE)])
def test_resume_with_another_style_is_refused(tmp_path, start, change):
    data = synthetic_slices()
    out = interrupted(data, tmp_path / "m", task_style=start)
    with pytest.raises(TrainError, match=f"cannot resume with task_style={change!r}; .* with {start!r}"):
        train_member(data, out, tiny(steps=4, ckpt_every=2, task_style=change), resume=True)
    train_member(data, out, tiny(steps=4, ckpt_every=2, task_style=start), resume=True)
    info = load_checkpoint(out)[1]["training"]
    assert (info["task_style"], info["steps_done"]) == (start, 4)


def test_a_state_saved_before_the_setting_resumes_as_reference(tmp_path):
    data = synthetic_slices()
    out = interrupted(data, tmp_path / "m")
    pointer = json.loads((out / STATE_DIR / LATEST).read_text())
    path = out / STATE_DIR / pointer["state"]
    state = json.loads(path.read_text())
    del state["config"]["task_style"]
    path.write_text(json.dumps(state))
    assert read_saved_config(out)["task_style"] == "reference"
    with pytest.raises(TrainError, match="cannot resume with task_style='legacy'"):
        train_member(data, out, tiny(steps=4, ckpt_every=2, task_style=LEGACY), resume=True)
    train_member(data, out, tiny(steps=4, ckpt_every=2, task_style="reference"), resume=True)


# ----------------------------------------------------------------- synth


def synth(scan: Path, out: Path, *style: str) -> dict[str, np.ndarray]:
    argv = [scan, "-o", out, "--seed", "3", "--size", "32", "--slices", "4", *style]
    assert main(["-q", "synth", *map(str, argv)]) == 0
    return {t: np.asarray(nib.load(out / f"scan_{t}_corrupted.nii.gz").dataobj) for t in TASKS}


def test_synth_flag_reaches_the_tasks_and_changes_the_output(make_nifti, tmp_path, monkeypatch):
    scan = make_nifti(phantom(seed=1), name="scan.nii.gz")
    styles: list[str] = []
    real = scan_module.apply_task

    def spy(*args, style, **kw):
        styles.append(style)
        return real(*args, style=style, **kw)

    monkeypatch.setattr(scan_module, "apply_task", spy)
    legacy = synth(scan, tmp_path / "legacy", "--task-style", LEGACY)
    assert styles and set(styles) == {LEGACY}
    styles.clear()
    default = synth(scan, tmp_path / "default")
    assert styles and set(styles) == {DEFAULT_STYLE}
    reference = synth(scan, tmp_path / "reference", "--task-style", "reference")
    for task in TASKS:
        np.testing.assert_array_equal(default[task], reference[task])  # the default is the reference
    differ = [t for t in TASKS if not np.array_equal(legacy[t], reference[t])]
    assert len(differ) >= 4, differ  # same seed, other task details


def test_shared_flag_helper():
    args = argparse.Namespace(task_style=None)
    from pseudohealthy.cli.synth import task_style

    assert task_style(args) == DEFAULT_STYLE
    assert task_style(argparse.Namespace(task_style=LEGACY)) == LEGACY
