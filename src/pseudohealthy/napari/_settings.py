"""Widget settings persisted between sessions as JSON in the user's config folder.

The sampler names and defaults are the engine's (:mod:`pseudohealthy.engine.defaults`); a saved
file with other values still loads (unknown samplers fall back to the default).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pseudohealthy.data.files import write_json
from pseudohealthy.engine.defaults import DEFAULT_SAMPLER, SAMPLERS, default_steps

__all__ = ["SAMPLERS", "SLICE_MODES", "WidgetSettings", "config_dir", "load_settings", "save_settings"]

ENV_DIR = "PSEUDOHEALTHY_CONFIG_DIR"  # overrides the folder (tests, portable installs)
FILE_NAME = "napari-widget.json"
SLICE_MODES = ("current", "around", "range", "all")


@dataclass
class WidgetSettings:
    """What the restore widget remembers."""

    ensemble: str = ""
    members: list[str] | None = None  # checked member names; None = all
    sampler: str = DEFAULT_SAMPLER
    steps: int = default_steps(DEFAULT_SAMPLER)
    device: str = "auto"
    slice_mode: str = "current"
    around: int = 2
    seed: int = 0

    def clean(self) -> WidgetSettings:
        """Replace out-of-range values by the defaults."""
        default = WidgetSettings()
        if self.sampler not in SAMPLERS:
            self.sampler = default.sampler
        if self.slice_mode not in SLICE_MODES:
            self.slice_mode = default.slice_mode
        self.steps = int(min(max(int(self.steps), 1), 1000))
        self.around = int(min(max(int(self.around), 0), 500))
        self.seed = int(self.seed)
        return self


def config_dir() -> Path:
    """Folder of the settings file (``$PSEUDOHEALTHY_CONFIG_DIR`` or the platform's user config dir)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    from platformdirs import user_config_dir

    return Path(user_config_dir("pseudohealthy"))


def load_settings(path: Path | None = None) -> WidgetSettings:
    """Read the saved settings; unreadable or missing files give the defaults."""
    path = path or config_dir() / FILE_NAME
    try:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(WidgetSettings)}
        return WidgetSettings(**{k: v for k, v in raw.items() if k in known}).clean()
    except (OSError, ValueError, TypeError, AttributeError):
        return WidgetSettings()


def save_settings(settings: WidgetSettings, path: Path | None = None) -> Path | None:
    """Write the settings atomically; returns the path, or None when the folder is not writable."""
    path = path or config_dir() / FILE_NAME
    try:
        return write_json(path, asdict(settings))
    except OSError:
        return None
