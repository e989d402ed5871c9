"""The choices and defaults every face offers (command line, viewer, ``evaluate``, benchmarks).

Defined once here and imported everywhere else. Nothing here imports torch, so that
``pseudohealthy --help`` stays instant.
"""

from __future__ import annotations

__all__ = [
    "BASELINE_T_START",
    "COMPILE_MODES",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "PRECISIONS",
    "SAMPLERS",
    "default_steps",
]

SAMPLERS = ("ddpm", "ddim", "dpm")
"""Sampler names (:mod:`pseudohealthy.engine.sampler`), in the order the faces offer them."""

DEFAULT_STEPS = {"ddpm": 50, "ddim": 10, "dpm": 20}
"""Steps (network calls per member and slice) when none are given: DDPM 50 is the paper's;
DDIM 10 stayed within 0.01 AP_p of it on the synthetic validation anomalies
(``benchmarks/bench_steps.py``, README "Fewer sampler steps")."""

DEFAULT_SAMPLER = "ddim"
"""The sampler of the command line, the viewer, ``evaluate`` and the demo when none is named."""

BASELINE_T_START = 250
"""Partial-noising depth of an unconditioned (baseline) ensemble, at inference and in training
validation alike: the input is noised to t = 250 of 1000 and denoised from there (AnoDDPM, Wyatt
et al. 2022: enough noise to remove lesions, little enough to keep the anatomy)."""

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
"""Autocast precisions (:func:`pseudohealthy.device.autocast_dtype`); "auto": bf16/fp16 on CUDA."""

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
"""``torch.compile`` modes for restoration (``reduce-overhead`` adds CUDA graphs on a GPU)."""


def default_steps(sampler: str) -> int:
    """The default number of steps of ``sampler``."""
    if sampler not in DEFAULT_STEPS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return DEFAULT_STEPS[sampler]
