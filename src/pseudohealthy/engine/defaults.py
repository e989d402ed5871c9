"""The choices and defaults every face offers (command line, viewer, ``evaluate``, benchmarks).

Defined once here and imported everywhere else. Nothing here imports torch, so that
``pseudohealthy --help`` stays instant.
"""

from __future__ import annotations

__all__ = [
    "BASELINE_T_START",
    "COMPILE_MODES",
    "DEFAULT_SAMPLER",
    "DEFAULT_SPACING",
    "DEFAULT_STEPS",
    "FAITHFUL_SSIM",
    "PRECISIONS",
    "SAMPLERS",
    "SPACINGS",
    "default_steps",
]

SAMPLERS = ("ddpm", "ddim", "dpm", "onepass")
"""Sampler names (:mod:`pseudohealthy.engine.sampler`), in the order the faces offer them.
"onepass": ``steps`` = K independent single network passes from pure noise, the mean of their
x0 estimates (as DISYRE averages its draws)."""

DEFAULT_STEPS = {"ddpm": 50, "ddim": 3, "dpm": 20, "onepass": 1}
"""Steps (network calls per member and slice) when none are given: DDPM 50 is the paper's;
DDIM 3 is the fewest passes whose AP_p stays within 0.01 of DDPM 50 on the bundled demo
ensemble's synthetic validation anomalies (patient 0004: 0.335 against 0.272 for the ensemble,
``benchmarks/bench_steps.py``; 0.230 against 0.234 as the members' mean, ``benchmarks/bench_recipe.py``)
and whose healthy tissue keeps SSIM >= 0.85 and PSNR >= 27 dB (0.917-0.931, 31.8-32.8 dB); DDIM 2
fails the fidelity rule (SSIM 0.81-0.86), one pass both (README "Fewer sampler steps"). The
members trained from scratch before them chose DDIM 5; onepass: one draw."""

SPACINGS = ("leading", "trailing")
"""Timestep spacings of ``ddpm`` / ``ddim`` (Lin et al. 2024, Table 2): "leading" strides from 0
(50 steps: 980, ..., 0, as the reference), "trailing" from ``T - 1`` (999, 979, ..., 19)."""

DEFAULT_SPACING = "leading"
"""The spacing when none is named (the reference's)."""

DEFAULT_SAMPLER = "ddim"
"""The sampler of the command line, the viewer, ``evaluate`` and the demo when none is named."""

BASELINE_T_START = 250
"""Partial-noising depth of an unconditioned (baseline) ensemble, at inference and in training
validation alike: the input is noised to t = 250 of 1000 and denoised from there (AnoDDPM, Wyatt
et al. 2022: enough noise to remove lesions, little enough to keep the anatomy)."""

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
"""Autocast precisions (:func:`pseudohealthy.device.autocast_dtype`); "auto": bf16/fp16 on CUDA,
bf16 on CPUs with amx_bf16/avx512_bf16 (Arm: bf16), fp32 on other CPUs."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""``torch.compile`` modes for restoration (``reduce-overhead`` adds CUDA graphs on a GPU)."""

FAITHFUL_SSIM = True
"""The anomaly map's SSIM constants by default: the reference's (data range 255 on [0, 1] images,
``engine.maps.anomaly_map(faithful=True)``) rather than data range 1, chosen on validation and dev
slices (never the demo's test patient) by ``benchmarks/bench_ssim.py``."""


def default_steps(sampler: str) -> int:
    """The default number of steps of ``sampler``."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return DEFAULT_STEPS[sampler]
