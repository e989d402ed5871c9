"""Independent, reproducible random streams (never the global numpy state)."""

from __future__ import annotations

import numpy as np

__all__ = ["keyed_rng", "sample_rng", "worker_rng"]

# spawn keys keep sample and keyed streams apart from worker streams for equal integer keys
_SAMPLE, _KEYED = 1, 2


def _check(*values: int) -> list[int]:
    out = []
    for v in values:
        iv = int(v)
        if iv != v or iv < 0:
            raise ValueError(f"random keys must be non-negative integers, got {v!r}")
        out.append(iv)
    return out


def worker_rng(seed: int, worker_id: int, epoch: int = 0) -> np.random.Generator:
    """The stream of one data-loader worker in one epoch: ``SeedSequence([seed, epoch, worker_id])``.

    Every worker gets its own stream (the reference release shared one between workers).
    """
    entropy = _check(seed, epoch, worker_id)
    return np.random.default_rng(np.random.SeedSequence(entropy))


def sample_rng(seed: int, index: int, epoch: int = 0) -> np.random.Generator:
    """The stream of one sample in one epoch, independent of which worker draws it."""
    entropy = _check(seed, epoch, index)
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(_SAMPLE,)))


def keyed_rng(seed: int, *keys: int) -> np.random.Generator:
    """A stream named by any tuple of non-negative integers (e.g. task and slice index)."""
    entropy = _check(seed, *keys)
    return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=(_KEYED,)))
