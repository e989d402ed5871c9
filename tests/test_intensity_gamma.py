"""`train --intensity-gamma A`: each training slice and its condition raised to one power
exp(U(-A, A)) from a stream of its own (the corruptions stay those of an unaugmented run); the
setting reaches TrainConfig and the member's JSON, is refused out of range, and a state saved
before it existed resumes without augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pseudohealthy.cli import build_parser
from pseudohealthy.cli import train as train_cli
from pseudohealthy.data.anomalies import fold_tasks
from pseudohealthy.data.dataset import CorruptedSliceDataset
from pseudohealthy.training.config import (
    LEGACY_VALUES,
    MAX_INTENSITY_GAMMA,
    MUST_MATCH,
    TrainConfig,
    TrainError,
)
from test_dataset import ixi_dir, slices  # noqa: F401  (module fixtures: real healthy slices)


def test_the_same_power_for_slice_and_condition_and_the_same_corruption(slices):  # noqa: F811
    tasks = fold_tasks(9)[0]
    plain = CorruptedSliceDataset(slices, slices.train_index, tasks, seed=5)
    aug = CorruptedSliceDataset(slices, slices.train_index, tasks, seed=5, gamma=0.5)
    powers = []
    for key in [(e, i) for e in range(2) for i in range(min(6, len(plain)))]:
        a, b = plain[key], aug[key]
        assert torch.equal(a["mask"], b["mask"]) and a["task"] == b["task"]  # same corruption
        x0, cond = a["x0"].numpy().astype(np.float64), a["cond"].numpy().astype(np.float64)
        inside = (x0 > 0.05) & (x0 < 0.95)
        power = float(np.median(np.log(b["x0"].numpy()[inside]) / np.log(x0[inside])))
        assert np.exp(-0.5) - 1e-6 <= power <= np.exp(0.5) + 1e-6
        np.testing.assert_allclose(b["x0"].numpy(), x0**power, atol=1e-5)
        np.testing.assert_allclose(b["cond"].numpy(), cond**power, atol=1e-5)  # one power for both
        assert torch.equal(b["x0"] == 0, a["x0"] == 0)  # background stays 0
        powers.append(power)
    assert np.ptp(powers) > 0.1  # drawn afresh per slice and epoch
    assert torch.equal(aug[(0, 1)]["x0"], aug[(0, 1)]["x0"])  # and reproducibly


def test_setting_cli_range_and_resume(tmp_path):
    assert "intensity_gamma" in MUST_MATCH and LEGACY_VALUES["intensity_gamma"] == 0.0
    assert TrainConfig().intensity_gamma == 0.0  # the reference trains without it
    argv = ["train", "d", "-o", str(tmp_path / "run"), "--preset", "tiny"]
    parse = build_parser().parse_args
    assert train_cli._config(parse(argv), [0], "cpu").intensity_gamma == 0.0
    config = train_cli._config(parse([*argv, "--intensity-gamma", "0.5"]), [0], "cpu")
    assert config.intensity_gamma == 0.5 and config.to_dict()["intensity_gamma"] == 0.5
    for bad in (-0.1, MAX_INTENSITY_GAMMA + 0.5):
        with pytest.raises(TrainError, match="intensity_gamma must be in"):
            TrainConfig.for_preset("tiny", intensity_gamma=bad).validate()


def test_training_uses_it_and_the_member_records_it(tmp_path, monkeypatch):
    import pseudohealthy.training.loop as loop_module
    from pseudohealthy.model.checkpoint import load_checkpoint
    from pseudohealthy.training.loop import train_member
    from test_train_options import tiny
    from test_training_loop import synthetic_slices

    built: list[float] = []
    real = loop_module.CorruptedSliceDataset

    class Recording(real):
        def __init__(self, *args, **kw) -> None:
            super().__init__(*args, **kw)
            built.append(self.gamma)

    monkeypatch.setattr(loop_module, "CorruptedSliceDataset", Recording)
    out = train_member(synthetic_slices(), tmp_path / "fold_0", tiny(steps=1, intensity_gamma=0.3))
    assert built == [0.3]
    assert load_checkpoint(out)[1]["training"]["intensity_gamma"] == 0.3
