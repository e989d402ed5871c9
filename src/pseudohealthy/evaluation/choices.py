"""The evaluation frames ``evaluate`` offers and their default (numpy- and torch-free, so that
``pseudohealthy --help`` stays light); the rules of each frame are in :mod:`.frame`."""

from __future__ import annotations

__all__ = ["DEFAULT_FRAME", "FRAMES", "NATIVE_SIZE"]

FRAMES = ("model", "native")
"""Where maps are scored: the model frame as restored (the reference) or after the scan's grid."""
DEFAULT_FRAME = "model"
NATIVE_SIZE = 128  # the native frame's default size
