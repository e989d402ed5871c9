"""Fault injection, checkpoints: every hostile or broken member is refused with its field named.

Each bad checkpoint is made on the fly from a tiny random ensemble (``fold0``, ``fold1``): the
damage goes to ``fold1``, and each case says where it must be caught (``open``: when the
ensemble is opened, before any tensor is read; ``load``: when the member's weights are read;
``run``: when the network's output is checked), by which error, naming which file and field.
The same damage through ``pseudohealthy restore`` must exit non-zero with a one-line error and
write nothing. The checkpoint-bomb test checks that edited settings asking for absurd sizes are
refused with bounded peak memory, in a fresh process.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import phantom, write_nifti
from pseudohealthy.cli import main
from pseudohealthy.engine.frame import restore_frame
from pseudohealthy.engine.reference import random_ensemble
from pseudohealthy.engine.sampler import SamplerPlan
from pseudohealthy.errors import CheckpointError, NonFiniteError, PseudohealthyError
from pseudohealthy.model.checkpoint import INFO_FILE, WEIGHTS_FILE, Ensemble, load_checkpoint, save_checkpoint
from pseudohealthy.model.diffusion import Schedule
from pseudohealthy.model.network import build_model, get_preset

VICTIM = "fold1"  # the member every case damages
FAST = ["--sampler", "ddim", "--steps", "2", "--device", "cpu", "--batch-size", "4"]
SOME_TENSOR = "unet.down_blocks.0.resnets.0.conv1.conv.weight"

Edit = Callable[[Path], None]  # damages the ensemble folder it is given


# ---- the damage -------------------------------------------------------------------------------


def _set_json(changes: dict[str, Any], member: str = VICTIM) -> Edit:
    """Set dotted keys (``"schedule.T"``) of a member's ``pseudohealthy.json``."""

    def edit(root: Path) -> None:
        path = root / member / INFO_FILE
        info = json.loads(path.read_text())
        for key, value in changes.items():
            *parents, last = key.split(".")
            target = info
            for part in parents:
                target = target.setdefault(part, {})
            target[last] = value
        path.write_text(json.dumps(info))

    return edit


def _strip_record(root: Path) -> None:
    """The victim's weights re-saved without the settings record (as older checkpoints are)."""
    weights = root / VICTIM / WEIGHTS_FILE
    save_file(load_file(weights), weights, metadata={"format": "pt"})


def _both(*edits: Edit) -> Edit:
    def edit(root: Path) -> None:
        for e in edits:
            e(root)

    return edit


def _edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Edit:
    """Change the victim's tensors, keeping its header metadata."""

    def edit(root: Path) -> None:
        weights = root / VICTIM / WEIGHTS_FILE
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata()
        state = load_file(weights)
        change(state)
        save_file(state, weights, metadata=metadata)

    return edit


def _all_nan(state: dict[str, torch.Tensor]) -> None:
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))


def _one_inf(state: dict[str, torch.Tensor]) -> None:
    state[SOME_TENSOR].view(-1)[3] = float("inf")


def _overflowing_output(state: dict[str, torch.Tensor]) -> None:
    """Finite weights whose output overflows float32: the noise prediction's bias near 3e38."""
    for name, tensor in state.items():
        if name.startswith("unet.out.") and name.endswith("bias"):
            tensor.fill_(3e38)


class _Payload:
    """A pickle that, if anything ever unpickled it, would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _marker(root: Path) -> Path:
    return root.parent / "UNPICKLED"


def _write_pickle(root: Path, path: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(_marker(root))))


def _only_a_pt(root: Path) -> None:
    folder = root / VICTIM
    for f in folder.iterdir():
        f.unlink()
    _write_pickle(root, folder / "model.pt")


def _json_and_pt(root: Path) -> None:
    (root / VICTIM / WEIGHTS_FILE).unlink()
    _write_pickle(root, root / VICTIM / "model.pt")


def _pickle_as_safetensors(root: Path) -> None:
    _write_pickle(root, root / VICTIM / WEIGHTS_FILE)


def _pt_in_ensemble_folder(root: Path) -> None:
    _write_pickle(root, root / "ensemble.pt")


def _no_json(root: Path) -> None:
    (root / VICTIM / INFO_FILE).unlink()


def _unfinished_training(root: Path) -> None:
    folder = root / VICTIM
    for f in folder.iterdir():
        f.unlink()
    (folder / "log.csv").write_text("step,loss\n10,0.5\n")
    (folder / "train_state").mkdir()
    save_file({"x": torch.zeros(2)}, folder / "train_state" / "state_10.safetensors")


def _truncate(root: Path) -> None:
    weights = root / VICTIM / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _huge_json(root: Path) -> None:
    path = root / VICTIM / INFO_FILE
    info = json.loads(path.read_text())
    info["padding"] = " " * (17 * 2**20)
    path.write_text(json.dumps(info))


def _resave(preset: str = "tiny", schedule: Schedule | None = None, **overrides: Any) -> Edit:
    """Replace the victim by a valid member of another kind (architecture or schedule)."""

    def edit(root: Path) -> None:
        shutil.rmtree(root / VICTIM)
        cfg = get_preset(preset, **overrides)
        save_checkpoint(build_model(cfg), cfg, {"fold": 1}, root / VICTIM, schedule=schedule)

    return edit


def _first_wider_tensor() -> str:
    ours, wide = (
        build_model("tiny").state_dict(),
        build_model(get_preset("tiny", channels=(8, 32))).state_dict(),
    )
    return next(k for k in ours if ours[k].shape != wide[k].shape)


def _first_float_tensor() -> str:  # the loader checks the tensors in name order
    return min(k for k, v in build_model("tiny").state_dict().items() if v.is_floating_point())


# ---- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad checkpoint: its damage, the file and field the error names, a phrase of the
    message, and where it is caught (``open``, ``load`` or ``run``). ``alone``: a refusal of
    the member itself (also by :func:`load_checkpoint`), not of it beside the other member."""

    edit: Edit
    file: str  # relative to the ensemble folder
    field: str | None
    message: str
    stage: str = "open"
    alone: bool = True


JSON = f"{VICTIM}/{INFO_FILE}"
WEIGHTS = f"{VICTIM}/{WEIGHTS_FILE}"

CASES: dict[str, Case] = {
    # schedule: bounded before anything is computed
    "T = 2e8": Case(_set_json({"schedule.T": 200_000_000}), JSON, "schedule.T", "1..10000"),
    "T = 2e7 as a float": Case(_set_json({"schedule.T": 2e7}), JSON, "schedule.T", "1..10000"),
    "T true": Case(_set_json({"schedule.T": True}), JSON, "schedule.T", "integer"),
    "beta_end 1.5": Case(_set_json({"schedule.beta_end": 1.5}), JSON, "schedule.beta_end", "(0, 1)"),
    "betas reversed": Case(
        _set_json({"schedule.beta_start": 0.5, "schedule.beta_end": 0.01}),
        JSON,
        "schedule.beta_start",
        "must not exceed",
    ),
    "schedule kind a list": Case(_set_json({"schedule.kind": ["linear"]}), JSON, "schedule.kind", "unknown"),
    # model sizes: bounded before anything is built
    "a million channels": Case(
        _set_json({"model.channels": [1_000_000, 1_000_000]}), JSON, "model.channels", "1..2048"
    ),
    "a thousand levels": Case(_set_json({"model.channels": [8] * 1000}), JSON, "model.channels", "at most 8"),
    "channels as strings": Case(
        _set_json({"model.channels": ["8", "16"]}), JSON, "model.channels", "integers"
    ),
    "channels as floats": Case(_set_json({"model.channels": [8.5, 16]}), JSON, "model.channels", "integers"),
    "a million res blocks": Case(
        _set_json({"model.num_res_blocks": 1_000_000}), JSON, "model.num_res_blocks", "1..8"
    ),
    "a million head channels": Case(
        _set_json({"model.num_head_channels": 1_000_000}), JSON, "model.num_head_channels", "1..2048"
    ),
    "a million norm groups": Case(
        _set_json({"model.norm_num_groups": 1_000_000}), JSON, "model.norm_num_groups", "1..2048"
    ),
    "1e5 image channels": Case(
        _set_json({"model.image_channels": 100_000}), JSON, "model.image_channels", "1..16"
    ),
    "image size 1e6": Case(
        _set_json({"model.image_size": 2**20, "image_size": 2**20}), JSON, "model.image_size", "16..1024"
    ),
    "image size 8": Case(
        _set_json({"model.image_size": 8, "image_size": 8}), JSON, "model.image_size", "16..1024"
    ),
    "norm_eps 0": Case(_set_json({"model.norm_eps": 0}), JSON, "model.norm_eps", "(0, 1]"),
    "image size a string": Case(_set_json({"image_size": "32"}), JSON, "image_size", "disagrees"),
    # real booleans
    'attention "false"': Case(
        _set_json({"model.attention_levels": ["false", True]}), JSON, "model.attention_levels", "'false'"
    ),
    "attention 0 and 1": Case(
        _set_json({"model.attention_levels": [0, 1]}), JSON, "model.attention_levels", "true or false"
    ),
    'decoder attention "true"': Case(
        _set_json({"model.decoder_attention_levels": ["true", "true"]}),
        JSON,
        "model.decoder_attention_levels",
        "true or false",
    ),
    'conditioned "false"': Case(
        _set_json({"model.conditioned": "false"}), JSON, "model.conditioned", "true or false"
    ),
    # settings edited within bounds, against what the weights were saved with
    "image size edited": Case(
        _set_json({"model.image_size": 64, "image_size": 64}),
        JSON,
        "image_size",
        "disagrees with the weights",
    ),
    "image size edited, no record, trainer's slice size": Case(
        _both(
            _strip_record,
            _set_json({"model.image_size": 64, "image_size": 64, "normalisation.size": 32}),
        ),
        JSON,
        "image_size",
        "normalisation.size",
    ),
    "T edited to 500": Case(_set_json({"schedule.T": 500}), JSON, "schedule.T", "disagrees with the weights"),
    "norm groups edited (no tensor shows it)": Case(
        _set_json({"model.norm_num_groups": 8}), JSON, "model.norm_num_groups", "disagrees with the weights"
    ),
    "channels edited": Case(
        _set_json({"model.channels": [8, 32]}), JSON, "model.channels", "disagrees with the weights"
    ),
    "channels edited, no record": Case(
        _both(_strip_record, _set_json({"model.channels": [8, 32]})), WEIGHTS, _first_wider_tensor(), "shape"
    ),
    "prediction v": Case(_set_json({"prediction": "v"}), JSON, "prediction", "unsupported prediction"),
    "modality a number": Case(_set_json({"modality": 3}), JSON, "modality", "string"),
    "a 17 MB pseudohealthy.json": Case(_huge_json, JSON, None, "too large"),
    # folders that are not valid members: errors, never skipped, never unpickled
    "no pseudohealthy.json": Case(_no_json, VICTIM, None, f"no {INFO_FILE}", alone=False),
    "only a .pt": Case(_only_a_pt, VICTIM, None, "only safetensors", alone=False),
    "unfinished training": Case(_unfinished_training, VICTIM, None, "training unfinished", alone=False),
    "a .pt in the ensemble folder": Case(_pt_in_ensemble_folder, ".", None, "only safetensors", alone=False),
    "json and a .pt, no safetensors": Case(_json_and_pt, WEIGHTS, None, "only safetensors"),
    "a pickle named model.safetensors": Case(_pickle_as_safetensors, WEIGHTS, None, "corrupt"),
    "truncated weights": Case(_truncate, WEIGHTS, None, "corrupt or truncated"),
    # members that disagree
    "modalities disagree": Case(
        _both(_set_json({"modality": "FLAIR"}, "fold0"), _set_json({"modality": "T1"})),
        JSON,
        "modality",
        "'T1'",
        alone=False,
    ),
    "schedules disagree": Case(_resave(schedule=Schedule(T=500)), JSON, "schedule", "fold0", alone=False),
    "image sizes disagree": Case(_resave(image_size=64), JSON, "image_size", "fold0", alone=False),
    "conditioning disagrees": Case(_resave("tiny-baseline"), JSON, "model.conditioned", "fold0", alone=False),
    # non-finite values: in the weights, or out of the network
    "all-NaN weights": Case(_edit_weights(_all_nan), WEIGHTS, _first_float_tensor(), "non-finite", "load"),
    "one infinite weight": Case(_edit_weights(_one_inf), WEIGHTS, SOME_TENSOR, "1 of", "load"),
    "output overflows": Case(
        _edit_weights(_overflowing_output), VICTIM, None, "NaN or infinite", "run", alone=False
    ),
}


# ---- the fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_ensemble(tmp_path_factory.mktemp("template") / "ens", "tiny", 2)


@pytest.fixture
def damaged(request: pytest.FixtureRequest, template: Path, tmp_path: Path) -> tuple[Path, Case]:
    case = CASES[request.param]
    root = tmp_path / "ens"
    shutil.copytree(template, root)
    case.edit(root)
    return root, case


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_nifti(tmp_path_factory.mktemp("scan") / "scan.nii.gz", phantom((32, 32, 6)))


def _run(root: Path) -> None:
    """Restore a few random slices with every member (the model-frame engine)."""
    ens = Ensemble.from_dir(root)
    plan = SamplerPlan.for_ensemble("ddim", 2, ens.schedule, conditioned=ens.conditioned)
    images = np.random.default_rng(0).random((2, 32, 32), dtype=np.float32)
    models = [m.model("cpu") for m in ens]
    restore_frame(
        models, ens.names, images, images > 0.1, [0, 1], plan, ens.schedule, seed=0, conditioned=True
    )


def _refusal(root: Path, case: Case) -> PseudohealthyError:
    """The error the case's stage raises; the stages before it must pass."""
    if case.stage == "open":
        with pytest.raises(CheckpointError) as err:
            Ensemble.from_dir(root)
        return err.value
    ens = Ensemble.from_dir(root)
    if case.stage == "load":
        with pytest.raises(CheckpointError) as err:
            ens.members[1].model("cpu")
        return err.value
    with pytest.raises(NonFiniteError) as err:
        _run(root)
    return err.value


# ---- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_bad_checkpoint_is_refused_naming_file_and_field(damaged: tuple[Path, Case]) -> None:
    root, case = damaged
    exc = _refusal(root, case)
    text = str(exc)
    assert "\n" not in text and case.message in text, text
    if isinstance(exc, CheckpointError):
        assert exc.path == (root / case.file if case.file != "." else root), text
        assert exc.field == case.field, text
        assert str(exc.path) in text
    else:
        assert f"'{VICTIM}'" in text and "'fold0'" not in text
    if case.alone:
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(root / VICTIM)
        assert err.value.field == case.field and case.message in str(err.value)
    assert not _marker(root).exists(), "a pickle was unpickled"


@pytest.mark.parametrize("damaged", list(CASES), indirect=True)
def test_restore_exits_non_zero_with_one_line(
    damaged: tuple[Path, Case], scan: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, case = damaged
    out = tmp_path / "out"
    capsys.readouterr()
    rc = main(["-q", "restore", str(scan), "--ensemble", str(root), "-o", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc != 0, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if case.message in line]
    assert len(lines) == 1, err
    named = f"'{VICTIM}'" if case.stage == "run" else str(root / case.file if case.file != "." else root)
    assert named in lines[0] and (case.field or "") in lines[0], err
    assert not out.exists() or not list(out.glob("*.nii.gz")), "outputs written"
    assert not _marker(root).exists(), "a pickle was unpickled"


def test_good_members_and_tolerated_neighbours_load(template: Path, tmp_path: Path) -> None:
    """Hidden folders and folders without checkpoint files are not members; a modality in
    another case, or unknown, is not a disagreement; the settings the weights depend on are
    recorded in the weights' header."""
    root = tmp_path / "ens"
    shutil.copytree(template, root)
    (root / ".cache").mkdir()
    (root / ".cache" / "model.safetensors").write_bytes(b"ignored")
    (root / "figures").mkdir()
    (root / "figures" / "curve.png").write_bytes(b"")
    (root / "TRAINING.md").write_text("notes")
    _set_json({"modality": "FLAIR"}, "fold0")(root)
    _set_json({"modality": "flair"})(root)
    ens = Ensemble.from_dir(root)
    assert ens.names == ["fold0", "fold1"] and [m.prediction for m in ens] == ["epsilon", "epsilon"]
    _set_json({"modality": "unknown"})(root)
    assert Ensemble.from_dir(root)[1].modality is None
    with safe_open(str(root / "fold0" / WEIGHTS_FILE), framework="pt") as handle:
        record = handle.metadata()
    assert json.loads(record["pseudohealthy.model"])["image_size"] == 32
    assert json.loads(record["pseudohealthy.schedule"]) == Schedule().to_dict()
    # run-time settings may change without the weights
    _set_json({"model.use_flash_attention": False})(root)
    assert not Ensemble.from_dir(root)[1].model("cpu").fused_attention


BOMB_SCRIPT = textwrap.dedent(
    """
    import json, resource, shutil, sys
    from pathlib import Path
    from safetensors.torch import load_file, save_file
    from pseudohealthy.engine.reference import random_ensemble
    from pseudohealthy.errors import CheckpointError
    from pseudohealthy.model.checkpoint import Ensemble, load_checkpoint

    def status_mb(key):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def reset_peak():
        # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM, not ru_maxrss) to the
        # current RSS, so the growth measured is this phase's alone; else the peak so far
        # (ru_maxrss, KiB) is the baseline, which hides growth below it
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return peak_mb(), "ru_maxrss"
        return status_mb("VmRSS"), "reset"

    def peak_mb():
        try:
            return status_mb("VmHWM")
        except (OSError, KeyError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    root, bombs = Path(sys.argv[1]), json.loads(sys.argv[2])
    good = random_ensemble(root / "good", "tiny", 2)
    load_checkpoint(good / "fold0")  # imports and first-use costs before the baseline
    Ensemble.from_dir(good)
    before, how = reset_peak()
    seen = {}
    for name, (changes, strip) in bombs.items():
        folder = root / name
        shutil.copytree(good, folder)
        info_path = folder / "fold1" / "pseudohealthy.json"
        info = json.loads(info_path.read_text())
        for key, value in changes.items():
            *parents, last = key.split(".")
            target = info
            for part in parents:
                target = target[part]
            target[last] = value
        info_path.write_text(json.dumps(info))
        if strip:
            weights = folder / "fold1" / "model.safetensors"
            save_file(load_file(weights), weights, metadata={"format": "pt"})
        fields = []
        for attempt in (lambda: Ensemble.from_dir(folder), lambda: load_checkpoint(folder / "fold1")):
            try:
                attempt()
                fields.append("accepted")
            except CheckpointError as exc:
                fields.append(exc.field)
        seen[name] = {"fields": fields, "json_bytes": info_path.stat().st_size}
    delta = peak_mb() - before
    # the meter itself: 256 MB really allocated must show
    control_before, _ = reset_peak()
    import numpy as np
    block = np.ones(256 * 2**20, dtype=np.uint8)
    control = peak_mb() - control_before
    del block
    out = {"delta_mb": delta, "before_mb": before, "how": how, "control_mb": control, "seen": seen}
    print(json.dumps(out))
    """
)

LARGEST = {  # the largest network the bounds allow: a 19-billion-parameter model
    "model.channels": [2048] * 8,
    "model.attention_levels": [True] * 8,
    "model.num_res_blocks": 8,
    "model.image_size": 1024,
    "image_size": 1024,
}
BOMBS: dict[str, tuple[dict[str, Any], bool, str]] = {
    "T 2e8": ({"schedule.T": 200_000_000}, False, "schedule.T"),
    "T 2e7": ({"schedule.T": 20_000_000}, False, "schedule.T"),
    "channels 1e6": ({"model.channels": [1_000_000, 1_000_000]}, False, "model.channels"),
    "channels 1e6, groups 1": (
        {"model.channels": [1_000_000] * 8, "model.norm_num_groups": 1, "model.attention_levels": [True] * 8},
        False,
        "model.channels",
    ),
    "res blocks 1e6": ({"model.num_res_blocks": 1_000_000}, False, "model.num_res_blocks"),
    "image size 2**20": ({"model.image_size": 2**20, "image_size": 2**20}, False, "model.image_size"),
    "largest in bounds": (LARGEST, False, "model.attention_levels"),  # refused by the weights' record
    "largest in bounds, no record": (LARGEST, True, "unet.conv_in.conv.weight"),  # by their shapes
}
BOMB_LIMIT_MB = 200  # before the bounds: 23.5 GB for T = 2e8, 5.3 GB for the channels


def test_checkpoint_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    bombs = {name: (changes, strip) for name, (changes, strip, _) in BOMBS.items()}
    done = subprocess.run(
        [sys.executable, "-c", BOMB_SCRIPT, str(tmp_path), json.dumps(bombs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (_, _, field) in BOMBS.items():
        seen = result["seen"][name]
        assert seen["fields"] == [field, field], (name, seen)
        assert seen["json_bytes"] < 6000, (name, seen)  # a few KB of edited JSON
    print(f"checkpoint bombs: peak memory grew by {result['delta_mb']:.1f} MB ({result['how']})")
    if result["how"] == "reset":  # the meter sees a real allocation
        assert result["control_mb"] > 200, result
    assert result["delta_mb"] < BOMB_LIMIT_MB, result
