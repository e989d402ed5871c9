"""The naive reference loop: every member, every slice, one at a time, in float64 coefficients.

The yardstick of the engine (:mod:`pseudohealthy.engine.restore`). It shares no code with the
engine beyond the network and the checkpoint loading: its own timestep lists, its own DDPM,
DDIM, DPM-Solver++(2M) and one-pass steps written from the formulas, its own per-slice seeds
(the engine's documented rule: ``np.random.SeedSequence([seed, slice, crc32(member)])`` seeds a
CPU ``torch.Generator`` that draws all of a slice's noise at once), its own conversions of the
network output per prediction target, and its own SSIM (Wang et al. 2004). So for the same
settings the two must give the same maps (``tests/test_restore_equivalence.py``) while a bug in
either shows as a difference; ``benchmarks/bench_restore.py`` times both.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import correlate1d

from pseudohealthy.data.preprocess import PreparedScan
from pseudohealthy.engine.defaults import BASELINE_T_START
from pseudohealthy.engine.settings import RestoreSettings
from pseudohealthy.model.checkpoint import Ensemble

__all__ = ["naive_maps", "naive_ssim", "naive_timesteps", "random_ensemble"]

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # an 11-tap window, as Wang et al. 2004 and the reference
SSIM_K1, SSIM_K2 = 0.01, 0.03
FAITHFUL_L = 255.0  # the reference release's max_val on [0, 1] images


# --------------------------------------------------------------------------- SSIM


def _gaussian_window() -> np.ndarray:
    x = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return w / w.sum()


def _local_mean(a: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local mean, separable, zero outside the image (the reference's padding)."""
    w = _gaussian_window()
    return correlate1d(correlate1d(a, w, axis=0, mode="constant"), w, axis=1, mode="constant")


def naive_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """The SSIM map of two 2D images (population covariance, constants from ``data_range``)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = _local_mean(x), _local_mean(y)
    vx = _local_mean(x * x) - mx * mx
    vy = _local_mean(y * y) - my * my
    cxy = _local_mean(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def _member_map(restoration: np.ndarray, image: np.ndarray, fg: np.ndarray, faithful: bool) -> np.ndarray:
    out = np.clip(1.0 - naive_ssim(restoration, image, FAITHFUL_L if faithful else 1.0), 0.0, 1.0)
    out[~fg] = 0.0
    return out


# --------------------------------------------------------------------------- timesteps


def _spaced(steps: int, T: int, spacing: str) -> list[int]:
    if spacing == "trailing":  # from T - 1 down, stride T / steps (Lin et al. 2024)
        return [round(T - k * T / steps) - 1 for k in range(steps)]
    stride = T // steps
    return [k * stride for k in range(steps - 1, -1, -1)]


def _lam(a: float) -> float:
    """Half the log-SNR, ``log(sqrt(a) / sqrt(1 - a))``; -inf where no signal is left (zero SNR)."""
    return -math.inf if a <= 0.0 else 0.5 * math.log(a / (1.0 - a))


def _log_snr_spaced(steps: int, abar: Sequence[float]) -> list[int]:
    """Distinct timesteps from ``T - 1`` to 0 nearest to targets evenly spaced in log-SNR (from the
    last finite one)."""
    T = len(abar)
    if steps == 1:
        return [T - 1]
    lam = np.array([_lam(a) for a in abar])
    finite = lam[np.isfinite(lam)]
    targets = np.linspace(finite[-1], lam[0], steps)
    ts = [int(np.argmin(np.abs(lam - target))) for target in targets]
    ts = [min(max(t, steps - 1 - k), T - 1 - k) for k, t in enumerate(ts)]
    ts[0], ts[-1] = T - 1, 0
    for k in range(steps - 2, -1, -1):
        ts[k] = max(ts[k], ts[k + 1] + 1)
    return ts


def naive_timesteps(
    sampler: str, steps: int, abar: Sequence[float], *, spacing: str = "leading", t_start: int | None = None
) -> list[int]:
    """The network calls' timesteps, in order (``onepass``: ``steps`` calls at ``T - 1``)."""
    T = len(abar)
    if sampler == "onepass":
        return [T - 1 if t_start is None else t_start] * steps
    ts = _log_snr_spaced(steps, abar) if sampler == "dpm" else _spaced(steps, T, spacing)
    return ts if t_start is None else [t_start] + [t for t in ts if t < t_start]


def _n_draws(sampler: str, n_calls: int) -> int:
    return n_calls if sampler in ("ddpm", "onepass") else 1


# --------------------------------------------------------------------------- one slice


class _Model:
    """One member's network with the schedule's conventions (range, prediction target)."""

    def __init__(self, net: torch.nn.Module, schedule, abar: list[float], conditioned: bool) -> None:
        self.net, self.abar, self.conditioned = net, abar, conditioned
        self.prediction = getattr(schedule, "prediction", "epsilon")
        self.centred = bool(getattr(schedule, "centred", True))  # older checkpoints: [-1, 1]

    def to_model(self, x01: torch.Tensor) -> torch.Tensor:
        return x01 * 2.0 - 1.0 if self.centred else x01

    def to_image(self, x: torch.Tensor) -> np.ndarray:
        x = (x + 1.0) * 0.5 if self.centred else x
        return x.clamp(0.0, 1.0)[0, 0].double().cpu().numpy()

    def x0_eps(self, x: torch.Tensor, t: int, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped x0 estimate and the noise estimate of the network at ``(x, t)``."""
        a = self.abar[t]
        t_vec = torch.full((1,), t, dtype=torch.long, device=x.device)
        with torch.no_grad():
            out = self.net(x, t_vec, cond if self.conditioned else None).float()
        if self.prediction == "epsilon":
            eps = out
            x0 = (x - math.sqrt(1.0 - a) * out) / math.sqrt(a)
        elif self.prediction == "v":
            x0 = math.sqrt(a) * x - math.sqrt(1.0 - a) * out
            eps = math.sqrt(1.0 - a) * x + math.sqrt(a) * out
        else:  # "sample"
            x0 = out
            eps = (x - math.sqrt(a) * out) / math.sqrt(1.0 - a)
        return x0.clamp(-1.0, 1.0), eps


def _ddpm(x: torch.Tensor, x0: torch.Tensor, a_t: float, a_s: float, z: torch.Tensor) -> torch.Tensor:
    """A draw from the posterior q(x_s | x_t, x0) (Ho et al. 2020, eq. 6-7)."""
    alpha = a_t / a_s
    beta = 1.0 - alpha
    mean = (math.sqrt(a_s) * beta / (1.0 - a_t)) * x0 + (math.sqrt(alpha) * (1.0 - a_s) / (1.0 - a_t)) * x
    var = (1.0 - a_s) / (1.0 - a_t) * beta
    return mean + math.sqrt(max(var, 1e-20)) * z


def _sample(
    model: _Model, image: torch.Tensor, noise: torch.Tensor, sampler: str, ts: list[int], t_start: int | None
) -> torch.Tensor:
    """Run one slice through ``ts`` from ``noise`` (n_draws, 1, 1, S, S); the sample, model range."""
    cond = model.to_model(image)
    if sampler == "onepass":  # independent passes, each from its own draw; the mean x0 estimate
        starts = [_start(model, cond, noise[k], t, t_start) for k, t in enumerate(ts)]
        return torch.stack([model.x0_eps(x, t, cond)[0] for x, t in zip(starts, ts, strict=True)]).mean(0)
    x = _start(model, cond, noise[0], ts[0], t_start)
    prev: tuple[torch.Tensor, float] | None = None
    for i, t in enumerate(ts):
        x0, eps = model.x0_eps(x, t, cond)
        if i + 1 == len(ts):
            return x0
        a_t, a_s = model.abar[t], model.abar[ts[i + 1]]
        if sampler == "ddpm":
            x = _ddpm(x, x0, a_t, a_s, noise[i + 1])
        elif sampler == "ddim":  # eta = 0 (Song et al. 2021)
            x = math.sqrt(a_s) * x0 + math.sqrt(1.0 - a_s) * eps
        else:  # DPM-Solver++(2M), Lu et al. 2022, algorithm 2
            h = _lam(a_s) - _lam(a_t)
            d = x0 if prev is None else x0 + (h / (2.0 * prev[1])) * (x0 - prev[0])
            prev = (x0, h)
            x = math.sqrt((1.0 - a_s) / (1.0 - a_t)) * x + math.sqrt(a_s) * (1.0 - math.exp(-h)) * d
    return x


def _start(model: _Model, cond: torch.Tensor, z: torch.Tensor, t: int, t_start: int | None) -> torch.Tensor:
    if t_start is None:
        return z
    a = model.abar[t]
    return math.sqrt(a) * cond + math.sqrt(1.0 - a) * z


def _abar(schedule) -> list[float]:
    """``alpha_bar_t`` in float64 (before the float32 rounding of ``alphas_cumprod`` if possible)."""
    if hasattr(schedule, "abar_list"):
        return list(schedule.abar_list())
    return [float(a) for a in schedule.alphas_cumprod.double().tolist()]


def _seed(seed: int, index: int, member: str) -> int:
    crc = zlib.crc32(member.encode("utf-8"))
    return int(np.random.SeedSequence([int(seed), int(index), crc]).generate_state(1)[0])


# --------------------------------------------------------------------------- the loop


def naive_maps(
    prepared: PreparedScan,
    ensemble: Ensemble,
    settings: RestoreSettings,
    slices: Sequence[int],
    device: torch.device | str = "cpu",
) -> dict[int, np.ndarray]:
    """Ensemble 1 - SSIM maps in the model frame ``(S, S)`` of canonical axial ``slices``.

    Uses ``settings.sampler``, ``steps``, ``seed``, ``t_start``, ``spacing`` and
    ``faithful_ssim``; ignores batch size, precision and compilation (float32 network, batch 1).
    """
    device = torch.device(device)
    schedule = ensemble.schedule
    t_start = settings.t_start
    if t_start is None and not ensemble.conditioned:
        t_start = BASELINE_T_START
    abar = _abar(schedule)
    spacing = getattr(settings, "spacing", "leading")
    ts = naive_timesteps(settings.sampler, int(settings.steps), abar, spacing=spacing, t_start=t_start)
    n_draws = _n_draws(settings.sampler, len(ts))
    position = {int(k): j for j, k in enumerate(prepared.indices)}
    size = prepared.geometry.size
    maps: dict[int, list[np.ndarray]] = {int(k): [] for k in slices}
    for member in ensemble.members:
        model = _Model(member.model(device).float(), schedule, abar, ensemble.conditioned)
        for k, per_member in maps.items():
            j = position[k]
            gen = torch.Generator().manual_seed(_seed(settings.seed, k, member.name))
            noise = torch.randn((n_draws, 1, 1, size, size), generator=gen).to(device)
            image = torch.from_numpy(np.asarray(prepared.images[j], dtype=np.float32)[None, None]).to(device)
            x = _sample(model, image, noise, settings.sampler, ts, t_start)
            fg = np.asarray(prepared.masks[j], dtype=bool)
            per_member.append(_member_map(model.to_image(x), prepared.images[j], fg, settings.faithful_ssim))
    out = {}
    for k, per_member in maps.items():
        mean = np.mean(per_member, axis=0)
        mean[~np.asarray(prepared.masks[position[k]], dtype=bool)] = 0.0
        out[k] = mean.astype(np.float32)
    return out


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
