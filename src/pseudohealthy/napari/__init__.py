"""napari plugin: NIfTI reader/writer, sample data, restoration and threshold widgets.

Only this package (and ``pseudohealthy.cli.view``) imports napari and Qt. The modules are private
(npe2 layout); code outside the plugin uses the names below, loaded lazily so that importing the
package (the reader and writer do) loads no Qt.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

__all__ = [
    "RestoreWidget",
    "ThresholdWidget",
    "go_to_axial",
    "ground_truth_name",
    "layer_frame",
    "output_name",
    "quiet_opengl",
    "read_one",
    "show_axial",
]


class _NoAccelerateNote(logging.Filter):
    """Drops PyOpenGL's "No OpenGL_accelerate module loaded" note (harmless, printed at start)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OpenGL_accelerate" not in record.getMessage()


def quiet_opengl() -> None:
    """Silence PyOpenGL's note about its optional accelerator (idempotent; call before napari
    imports OpenGL)."""
    logger = logging.getLogger("OpenGL.acceleratesupport")
    if not any(isinstance(f, _NoAccelerateNote) for f in logger.filters):
        logger.addFilter(_NoAccelerateNote())


quiet_opengl()

_HOMES = {
    "RestoreWidget": "_restore_widget",
    "ThresholdWidget": "_threshold_widget",
    "go_to_axial": "_layers",
    "layer_frame": "_layers",
    "show_axial": "_layers",
    "read_one": "_reader",
    "ground_truth_name": "_outputs",
    "output_name": "_outputs",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
