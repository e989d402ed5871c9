"""The batched engine gives the naive reference loop's maps (same seeds), within TOLERANCE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import phantom
from pseudohealthy.data.io import volume_from_array
from pseudohealthy.engine.reference import naive_maps, random_ensemble
from pseudohealthy.engine.restore import prepare_for, restore_volume
from pseudohealthy.engine.settings import RestoreSettings
from pseudohealthy.model.checkpoint import Ensemble

TOLERANCE = 1e-4  # max abs difference of the ensemble maps (float32 on the CPU, batch 3 vs 1)
SLICES = [4, 6, 7]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: small convolutions on a busy small machine stall with more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory) -> Ensemble:
    root: Path = tmp_path_factory.mktemp("ens")
    return Ensemble.from_dir(random_ensemble(root, "tiny", 2))


@pytest.fixture(scope="module")
def volume():
    return volume_from_array(phantom((32, 40, 12)) * 300.0 + 20.0, affine=np.diag([1.0, 1.2, 2.0, 1.0]))


def _differences(volume, ensemble, settings: RestoreSettings, naive_seeds: list[int]) -> list[float]:
    """Largest |engine map - naive map| over the foreground of ``SLICES`` (slice grid), per naive seed."""
    result = restore_volume(volume, ensemble, settings, slices=SLICES)
    prepared = prepare_for(volume, ensemble, settings)
    out = []
    for seed in naive_seeds:
        naive = naive_maps(
            prepared, ensemble, RestoreSettings(**{**settings.to_dict(), "seed": seed}), SLICES
        )
        out.append(
            max(
                float(
                    np.abs(np.clip(prepared.geometry.from_model(naive[k]), 0, 1) - result.anomaly[:, :, k])[
                        prepared.foreground[:, :, k]
                    ].max()
                )
                for k in SLICES
            )
        )
    return out


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 10), ("ddim", 5)])
def test_batched_engine_matches_naive_loop(volume, ensemble, sampler: str, steps: int) -> None:
    settings = RestoreSettings(
        sampler=sampler, steps=steps, seed=3, device="cpu", batch_size=3, precision="fp32"
    )
    same, other = _differences(volume, ensemble, settings, naive_seeds=[3, 4])
    assert same < TOLERANCE
    assert other > 100 * TOLERANCE  # the comparison can fail: another seed gives clearly different maps


def test_compiled_members_match_the_naive_loop(volume, ensemble, monkeypatch) -> None:
    """``compile`` runs the members through Dynamo (here with the ``aot_eager`` backend: inductor's
    C++ build takes minutes on this CPU) and still gives the naive loop's maps."""
    real_compile, modes = torch.compile, []

    def recording_compile(model, *, mode=None, dynamic=None):
        modes.append((mode, dynamic))
        return real_compile(model, backend="aot_eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", recording_compile)
    torch._dynamo.reset()
    settings = RestoreSettings(
        sampler="ddim", steps=3, seed=3, device="cpu", batch_size=3, precision="fp32", compile="default"
    )
    same, other = _differences(volume, ensemble, settings, naive_seeds=[3, 4])
    assert modes == [("default", False)] * len(ensemble.members)  # every member, static shapes
    assert same < TOLERANCE and other > 100 * TOLERANCE


def test_compile_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="compile"):
        RestoreSettings(compile="fast").validate()
