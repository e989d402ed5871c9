"""The one switch between the reference's task details and our earlier ("legacy") ones.

``"reference"`` follows Baugh et al.'s task library (the default everywhere); ``"legacy"``
keeps the tasks as this project first wrote them, so that the two can be measured against
each other (``benchmarks/bench_synth.py --compare-styles``).
"""

from __future__ import annotations

__all__ = ["DEFAULT_STYLE", "STYLES", "check_style"]

STYLES = ("reference", "legacy")
DEFAULT_STYLE = "reference"


def check_style(style: str) -> str:
    """``style`` if it is one of :data:`STYLES`, else ``ValueError``."""
    if style not in STYLES:
        raise ValueError(f"unknown task style {style!r}; choose one of {', '.join(STYLES)}")
    return style
