"""napari plugin: NIfTI reader/writer, sample data, restoration and threshold widgets.

Only this package (and ``pseudohealthy.cli.view``) imports napari and Qt. The modules are private
(npe2 layout); code outside the plugin uses the names below, loaded lazily so that importing the
package (the reader and writer do) loads no Qt.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["RestoreWidget", "ThresholdWidget", "go_to_axial", "layer_frame", "read_one", "show_axial"]

_HOMES = {
    "RestoreWidget": "_restore_widget",
    "ThresholdWidget": "_threshold_widget",
    "go_to_axial": "_layers",
    "layer_frame": "_layers",
    "show_axial": "_layers",
    "read_one": "_reader",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
