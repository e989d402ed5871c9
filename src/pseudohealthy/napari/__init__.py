"""napari plugin: NIfTI reader/writer, sample data, restoration and threshold widgets.

Only this package (and ``pseudohealthy.cli.view``) imports napari and Qt. The widgets are
imported lazily so that the reader and writer load without Qt.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RestoreWidget", "ThresholdWidget"]


def __getattr__(name: str) -> Any:
    if name == "RestoreWidget":
        from pseudohealthy.napari._restore_widget import RestoreWidget

        return RestoreWidget
    if name == "ThresholdWidget":
        from pseudohealthy.napari._threshold_widget import ThresholdWidget

        return ThresholdWidget
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
