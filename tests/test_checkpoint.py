"""Checkpoint folders: round trip, every refusal, and ensembles of members."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from pseudohealthy.errors import CheckpointError
from pseudohealthy.model.checkpoint import (
    INFO_FILE,
    WEIGHTS_FILE,
    Ensemble,
    Member,
    load_checkpoint,
    save_checkpoint,
)
from pseudohealthy.model.diffusion import Schedule
from pseudohealthy.model.network import ConditionedUNet, build_model, get_preset

META = {
    "modality": "T2",
    "fold": 3,
    "train_tasks": [0, 2, 3],
    "val_tasks": [1, 4],
    "normalisation": "max",
    "validation": {"best_val_loss": 0.0123, "step": 500},
    "training": {"lr": 1e-4, "batch_size": 16},
}


def _model(name: str = "tiny", seed: int = 0) -> ConditionedUNet:
    torch.manual_seed(seed)
    model = build_model(name)
    for p in model.parameters():  # the output conv starts at zero: make outputs non-trivial
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _save(directory: Path, name: str = "tiny", seed: int = 0, **meta) -> ConditionedUNet:
    model = _model(name, seed)
    save_checkpoint(model, model.config, {**META, **meta}, directory)
    return model


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 1, 32, 32, generator=g), torch.randn(2, 1, 32, 32, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([10, 900]), c if model.config.conditioned else None)


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = _save(tmp_path / "m")
    loaded, info = load_checkpoint(tmp_path / "m")
    assert not loaded.training
    assert torch.equal(_outputs(model), _outputs(loaded))
    assert loaded.config == model.config
    assert info["fold"] == 3 and info["validation"]["best_val_loss"] == 0.0123
    assert info["path"] == str(tmp_path / "m")
    on_disk = json.loads((tmp_path / "m" / INFO_FILE).read_text())
    assert on_disk["format"] == "pseudohealthy-checkpoint" and on_disk["format_version"] == 1
    assert on_disk["model"] == model.config.to_dict() and on_disk["image_size"] == 32
    assert on_disk["schedule"] == Schedule().to_dict()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [WEIGHTS_FILE, INFO_FILE]  # no temp files
    # the json file may be named instead of its folder
    again, _ = load_checkpoint(tmp_path / "m" / INFO_FILE)
    assert torch.equal(_outputs(again), _outputs(model))


def test_ema_wrapper_saves_the_averaged_weights(tmp_path: Path) -> None:
    model = _model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    save_checkpoint(ema, model.config, META, tmp_path / "ema")
    loaded, _ = load_checkpoint(tmp_path / "ema")
    assert torch.equal(_outputs(loaded), _outputs(ema.module))
    assert not torch.equal(_outputs(loaded), _outputs(model))


def test_baseline_round_trip_and_overwrite(tmp_path: Path) -> None:
    first = _save(tmp_path / "b", "tiny-baseline", seed=1)
    second = _save(tmp_path / "b", "tiny-baseline", seed=2)  # saving again replaces atomically
    loaded, info = load_checkpoint(tmp_path / "b")
    assert not loaded.conditioned and info["model"]["conditioned"] is False
    assert torch.equal(_outputs(loaded), _outputs(second))
    assert not torch.equal(_outputs(loaded), _outputs(first))


def test_meta_values_are_made_json_ready(tmp_path: Path) -> None:
    model = _model()
    meta = {"fold": np.int64(4), "scores": np.array([0.5, 0.25]), "val_loss": float("nan"), "data": tmp_path}
    save_checkpoint(model, model.config, meta, tmp_path / "m")
    _, info = load_checkpoint(tmp_path / "m")
    assert info["fold"] == 4 and info["scores"] == [0.5, 0.25]
    assert info["val_loss"] is None and info["data"] == str(tmp_path)


def test_save_refuses_reserved_meta_keys(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(model, model.config, {"model": "x"}, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def _edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / INFO_FILE
        info = json.loads(path.read_text())
        edit(info)
        path.write_text(json.dumps(info))

    return apply


def _set(key: str, value) -> Callable[[dict], None]:
    def edit(info: dict) -> None:
        target = info
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return edit


_DELETE = object()


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])


def _garbage(folder: Path) -> None:
    (folder / WEIGHTS_FILE).write_bytes(b"\x00" * 7 + b"not safetensors at all")


def _edit_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        state = load_file(folder / WEIGHTS_FILE)
        edit(state)
        save_file(state, folder / WEIGHTS_FILE)

    return apply


WIDE = get_preset("tiny", channels=(8, 32))


def _wider(state: dict[str, torch.Tensor]) -> None:  # weights of another architecture
    wide = build_model(WIDE).state_dict()
    state.clear()
    state.update({k: v.contiguous() for k, v in wide.items()})


def _first_shape_mismatch() -> str:
    ours, wide = build_model("tiny").state_dict(), build_model(WIDE).state_dict()
    return next(k for k in ours if ours[k].shape != wide[k].shape)


SOME_TENSOR = "unet.down_blocks.0.resnets.0.conv1.conv.weight"


REFUSALS = {
    "missing json": (lambda f: (f / INFO_FILE).unlink(), INFO_FILE, None, "missing file"),
    "missing weights": (lambda f: (f / WEIGHTS_FILE).unlink(), WEIGHTS_FILE, None, "missing file"),
    "invalid json": (lambda f: (f / INFO_FILE).write_text("{not json"), INFO_FILE, None, "invalid JSON"),
    "json not an object": (lambda f: (f / INFO_FILE).write_text("[1, 2]"), INFO_FILE, None, "JSON object"),
    "wrong format": (
        _edit_json(_set("format", "something-else")),
        INFO_FILE,
        "format",
        "not a pseudohealthy",
    ),
    "newer version": (_edit_json(_set("format_version", 2)), INFO_FILE, "format_version", "newer"),
    "missing model": (_edit_json(_set("model", _DELETE)), INFO_FILE, "model", "missing field"),
    "missing schedule": (_edit_json(_set("schedule", _DELETE)), INFO_FILE, "schedule", "missing field"),
    "bad model field": (_edit_json(_set("model.channels", "8,16")), INFO_FILE, "model.channels", "list"),
    "unknown model field": (_edit_json(_set("model.depth", 3)), INFO_FILE, "model.depth", "unknown"),
    "missing model field": (
        _edit_json(_set("model.norm_num_groups", _DELETE)),
        INFO_FILE,
        "model.norm_num_groups",
        "missing",
    ),
    "bad schedule": (_edit_json(_set("schedule.T", -5)), INFO_FILE, "schedule.T", "1..10000"),
    "image size disagrees": (_edit_json(_set("image_size", 64)), INFO_FILE, "image_size", "disagrees"),
    "truncated weights": (_truncate, WEIGHTS_FILE, None, "corrupt or truncated"),
    "garbage weights": (_garbage, WEIGHTS_FILE, None, "corrupt or truncated"),
    "shape mismatch": (
        _edit_weights(_wider),
        WEIGHTS_FILE,
        _first_shape_mismatch(),
        "shape",
    ),
    "missing tensor": (_edit_weights(lambda s: s.pop(SOME_TENSOR)), WEIGHTS_FILE, SOME_TENSOR, "missing"),
    "extra tensor": (
        _edit_weights(lambda s: s.update({"unet.extra": torch.zeros(3)})),
        WEIGHTS_FILE,
        "unet.extra",
        "unexpected",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_file_and_the_field(tmp_path: Path, case: str) -> None:
    damage, filename, field, message = REFUSALS[case]
    folder = tmp_path / "ckpt"
    _save(folder)
    damage(folder)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    exc = err.value
    assert exc.path == folder / filename
    assert exc.field == field
    assert message in str(exc) and str(folder / filename) in str(exc)


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="does not exist"):
        Ensemble.from_dir(tmp_path / "nowhere")


def test_ensemble_of_member_folders(tmp_path: Path) -> None:
    for i, name in enumerate(["fold_2", "fold_0", "fold_1"]):
        _save(tmp_path / "ens" / name, seed=i, fold=int(name[-1]))
    (tmp_path / "ens" / "logs").mkdir()  # folders without any checkpoint file are not members
    (tmp_path / "ens" / "logs" / "train.csv").write_text("step,loss\n")
    ens = Ensemble.from_dir(tmp_path / "ens")
    assert ens.names == ["fold_0", "fold_1", "fold_2"] and len(ens) == 3
    assert ens.image_size == 32 and ens.conditioned and ens.schedule == Schedule()
    assert [m.name for m in ens] == ens.names
    desc = ens.describe()
    assert [d["fold"] for d in desc] == [0, 1, 2]
    assert (
        desc[0]["modality"] == "T2" and desc[0]["train_tasks"] == [0, 2, 3] and desc[0]["val_loss"] == 0.0123
    )
    member = ens.members[1]
    assert member._models == {}  # weights load lazily
    model = member.model("cpu")
    assert member.model("cpu") is model and not model.training
    sub = ens.select(["fold_2", "fold_0"])
    assert sub.names == ["fold_2", "fold_0"] and ens.select([1]).names == ["fold_1"]
    with pytest.raises(CheckpointError, match="no member named"):
        ens.select(["fold_9"])


def test_single_member_folder_is_an_ensemble_of_one(tmp_path: Path) -> None:
    _save(tmp_path / "only")
    ens = Ensemble.from_dir(tmp_path / "only")
    assert ens.names == ["only"]
    assert isinstance(ens[0], Member) and ens[0].info["fold"] == 3


def test_ensemble_refuses_empty_and_disagreeing_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints found"):
        Ensemble.from_dir(tmp_path / "empty")
    _save(tmp_path / "mixed" / "a")
    _save(tmp_path / "mixed" / "b", "tiny-baseline")
    with pytest.raises(CheckpointError) as err:
        Ensemble.from_dir(tmp_path / "mixed")
    assert err.value.field == "model.conditioned" and err.value.path == tmp_path / "mixed" / "b" / INFO_FILE
    _save(tmp_path / "sizes" / "a")
    small = build_model(get_preset("tiny", image_size=16))
    save_checkpoint(small, small.config, META, tmp_path / "sizes" / "b")
    with pytest.raises(CheckpointError) as err:
        Ensemble.from_dir(tmp_path / "sizes")
    assert err.value.field == "image_size"
    _save(tmp_path / "broken" / "a")
    _save(tmp_path / "broken" / "b")
    (tmp_path / "broken" / "b" / INFO_FILE).write_text("{")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        Ensemble.from_dir(tmp_path / "broken")


def test_half_precision_weights_load_as_float32(tmp_path: Path) -> None:
    model = _model()
    save_checkpoint(model, model.config, META, tmp_path / "full")
    save_checkpoint(model, model.config, META, tmp_path / "half", weights_dtype=torch.float16)
    stored = load_file(tmp_path / "half" / WEIGHTS_FILE)
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    full = (tmp_path / "full" / WEIGHTS_FILE).stat().st_size
    assert (tmp_path / "half" / WEIGHTS_FILE).stat().st_size < 0.6 * full
    loaded, _ = load_checkpoint(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    ref, out = _outputs(model), _outputs(loaded)
    assert not torch.equal(ref, out)  # really rounded ...
    assert torch.allclose(ref, out, atol=5e-2 * float(ref.abs().max()))  # ... but close
