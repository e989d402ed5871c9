"""The batched engine gives the maps of the naive reference loop (which shares no sampling, seeding,
prediction or SSIM code with it), within TOLERANCE; the naive SSIM is scikit-image's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from conftest import phantom
from pseudohealthy.data.io import volume_from_array
from pseudohealthy.engine.frame import restore_frame
from pseudohealthy.engine.maps import anomaly_map, ensemble_map
from pseudohealthy.engine.reference import naive_maps, naive_ssim, random_ensemble
from pseudohealthy.engine.restore import prepare_for, restore_volume
from pseudohealthy.engine.settings import RestoreSettings
from pseudohealthy.model import network
from pseudohealthy.model.checkpoint import Ensemble, save_checkpoint
from pseudohealthy.model.diffusion import Schedule

TOLERANCE = 1e-4  # max abs difference of the ensemble maps (float32 network on the CPU, batch 3 vs 1)
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


def _ensemble_with(folder: Path, schedule: Schedule, n_members: int = 2) -> Ensemble:
    """Random tiny members stored with ``schedule``; heads large enough that the output (for
    "sample" prediction the x0 itself) depends clearly on the noisy input."""
    cfg = network.get_preset("tiny")
    for m in range(n_members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(10 + m)
            net = network.build_model(cfg)
            with torch.no_grad():
                for p in net.unet.out.parameters():
                    p.normal_(0, 0.5)
        save_checkpoint(net, cfg, {"fold": m}, folder / f"fold{m}", schedule=schedule)
    return Ensemble.from_dir(folder)


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


def _check(volume, ensemble, **kw) -> None:
    settings = RestoreSettings(seed=3, device="cpu", batch_size=3, precision="fp32", **kw)
    same, other = _differences(volume, ensemble, settings, naive_seeds=[3, 4])
    assert same < TOLERANCE
    assert other > 10 * TOLERANCE  # the comparison can fail: another seed gives clearly different maps


@pytest.mark.parametrize(
    ("sampler", "steps", "faithful"),
    [("ddpm", 10, False), ("ddim", 5, False), ("dpm", 6, False), ("ddim", 5, True)],
)
def test_batched_engine_matches_naive_loop(
    volume, ensemble, sampler: str, steps: int, faithful: bool
) -> None:
    _check(volume, ensemble, sampler=sampler, steps=steps, faithful_ssim=faithful)


def test_onepass_matches_naive_loop(volume, ensemble) -> None:
    _check(volume, ensemble, sampler="onepass", steps=3)


def test_trailing_spacing_matches_naive_loop(volume, ensemble) -> None:
    _check(volume, ensemble, sampler="ddim", steps=5, spacing="trailing")


def test_partial_noising_matches_naive_loop(volume, ensemble) -> None:
    _check(volume, ensemble, sampler="ddpm", steps=10, t_start=300)


@pytest.mark.parametrize(
    ("prediction", "sampler", "zero_snr"),
    [("v", "ddim", False), ("v", "ddpm", False), ("sample", "dpm", False), ("v", "dpm", True)],
)
def test_predictions_match_naive_loop(
    volume, tmp_path, prediction: str, sampler: str, zero_snr: bool
) -> None:
    schedule = Schedule(prediction=prediction, zero_snr=zero_snr, centred=False)
    ensemble = _ensemble_with(tmp_path, schedule)
    assert ensemble.schedule == schedule  # the checkpoint carries the prediction and range
    _check(volume, ensemble, sampler=sampler, steps=5)


def test_faithful_ssim_setting_reaches_the_maps(volume, ensemble) -> None:
    """Both SSIM constants, through RestoreSettings: the engine's maps are the naive loop's for each,
    and the two settings give clearly different maps."""
    maps = {}
    for faithful in (False, True):
        settings = RestoreSettings(
            sampler="ddim",
            steps=3,
            seed=1,
            device="cpu",
            batch_size=3,
            precision="fp32",
            faithful_ssim=faithful,
        )
        (same,) = _differences(volume, ensemble, settings, naive_seeds=[1])
        assert same < TOLERANCE, faithful
        maps[faithful] = restore_volume(volume, ensemble, settings, slices=SLICES).anomaly
    assert np.abs(maps[True] - maps[False]).max() > 100 * TOLERANCE


def test_frame_maps_follow_faithful_ssim(ensemble) -> None:
    """restore_frame's maps are engine.maps.anomaly_map of its own restorations, per setting."""
    size = ensemble.image_size
    images = np.stack([phantom((size, size, 3), seed=s)[:, :, 1] for s in range(2)])
    masks = images > 0
    plan = RestoreSettings(sampler="ddim", steps=2).plan(ensemble.schedule, conditioned=ensemble.conditioned)
    models = [m.model("cpu").float() for m in ensemble.members]
    results = {}
    for faithful in (False, True):
        frame = restore_frame(
            models, ensemble.names, images, masks, [0, 1], plan, ensemble.schedule,
            seed=0, conditioned=ensemble.conditioned, device="cpu", precision="fp32", faithful_ssim=faithful,
        )  # fmt: skip
        expected = [anomaly_map(r, images, masks, faithful=faithful) for r in frame.restorations]
        np.testing.assert_allclose(frame.maps, ensemble_map(np.stack(expected), masks), rtol=0, atol=1e-6)
        results[faithful] = frame.maps
    assert np.abs(results[True] - results[False]).max() > 1e-3


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_naive_ssim_is_scikit_image_ssim(data_range: float) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((24, 31))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    r = 5  # zero padding by the window radius, then scikit-image's filter, then the crop
    _, expected = structural_similarity(
        np.pad(x, r), np.pad(y, r), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=data_range, full=True,
    )  # fmt: skip
    np.testing.assert_allclose(naive_ssim(x, y, data_range), expected[r:-r, r:-r], rtol=0, atol=1e-12)
    assert np.abs(naive_ssim(x, y, 1.0) - naive_ssim(x, y, 255.0)).max() > 0.1  # the constants matter


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
