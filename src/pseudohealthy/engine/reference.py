"""The naive reference loop: every member, every slice, one at a time, in float32.

The pattern of the reference release (no batching, no autocast), kept as the yardstick of the
engine (:mod:`pseudohealthy.engine.restore`): it draws the same per-slice noise
(:func:`~pseudohealthy.engine.sampler.slice_seed`), so for the same settings it must give the same maps
(``tests/test_restore_equivalence.py``) and ``benchmarks/bench_restore.py`` times both.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pseudohealthy.data.preprocess import PreparedScan
from pseudohealthy.engine.maps import anomaly_map, ensemble_map
from pseudohealthy.engine.sampler import denoise, slice_noise, slice_seed
from pseudohealthy.engine.settings import RestoreSettings
from pseudohealthy.model.checkpoint import Ensemble
from pseudohealthy.model.diffusion import from_model_range, to_model_range

__all__ = ["naive_maps"]


def naive_maps(
    prepared: PreparedScan,
    ensemble: Ensemble,
    settings: RestoreSettings,
    slices: Sequence[int],
    device: torch.device | str = "cpu",
) -> dict[int, np.ndarray]:
    """Ensemble 1 - SSIM maps in the model frame ``(S, S)`` of canonical axial ``slices``.

    Uses ``settings.sampler``, ``steps``, ``seed``, ``t_start`` and ``faithful_ssim``; ignores
    batch size and precision (always float32, batch 1).
    """
    device = torch.device(device)
    schedule = ensemble.schedule
    plan = settings.plan(schedule, conditioned=ensemble.conditioned)
    position = {int(k): j for j, k in enumerate(prepared.indices)}
    size = prepared.geometry.size
    maps: dict[int, list[np.ndarray]] = {int(k): [] for k in slices}
    for member in ensemble.members:
        net = member.model(device).float()
        for k in maps:
            j = position[k]
            image = to_model_range(torch.from_numpy(prepared.images[j][None, None]).to(device))
            seed = slice_seed(settings.seed, k, member.name)
            noise = slice_noise([seed], plan.n_draws, (1, size, size), device)
            cond = image if ensemble.conditioned else None
            *_, (_, x) = denoise(net, cond, plan, schedule, noise, image)
            rest = from_model_range(x)[0, 0].cpu().numpy()
            maps[k].append(
                anomaly_map(rest, prepared.images[j], prepared.masks[j], faithful=settings.faithful_ssim)
            )
    return {k: ensemble_map(np.stack(v), prepared.masks[position[k]]) for k, v in maps.items()}


def random_ensemble(folder: Path, preset: str = "tiny", n_members: int = 2) -> Path:
    """Write ``n_members`` randomly initialised checkpoints of ``preset`` (folds 0..) to ``folder``.

    For speed benchmarks and equivalence tests: the output head is set non-zero, so that the
    sampler does real work. Member ``m`` is initialised from seed ``m`` in a forked torch RNG
    (the caller's global random state is left as it was); returns ``folder``.
    """
    from pseudohealthy.model import checkpoint
    from pseudohealthy.model import network as model

    cfg = model.get_preset(preset)
    for m in range(n_members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(m)
            net = model.build_model(cfg)
            with torch.no_grad():
                for p in net.unet.out.parameters():
                    p.normal_(0, 0.05)
        checkpoint.save_checkpoint(net, cfg, {"fold": m}, folder / f"fold{m}")
    return folder
