"""Locate the bundled sample data: a real BraTS FLAIR scan, its lesion mask and the demo ensemble."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib.resources import files
from pathlib import Path

from pseudohealthy.errors import PseudohealthyError

__all__ = [
    "BUNDLED_ENSEMBLES",
    "bundled_ensemble_path",
    "bundled_name",
    "copy_sample",
    "demo_ensemble_path",
    "installed_ensembles",
    "resolve_ensemble",
    "sample_data_dir",
    "sample_mask_path",
    "sample_scan_path",
]

SAMPLE_LICENSE = "LICENSE-BraTS.txt"
SAMPLE_SCAN = "brats2013_pat0006_flair.nii.gz"
SAMPLE_MASK = "brats2013_pat0006_lesion.nii.gz"
DEMO_ENSEMBLE = "demo_ensemble"

BUNDLED_ENSEMBLES = {
    "demo": DEMO_ENSEMBLE,
    "demo-t1": "demo_ensemble_t1",
    "demo-sample": "demo_ensemble_sample",
    "demo-scratch": "demo_ensemble_scratch",
    "demo-epsilon": "demo_ensemble_epsilon",
}
"""Names that ``--ensemble`` (``restore``, ``evaluate``, ``view``) and the viewer's ensemble field
(and its menu of bundled ensembles) accept for a bundled ensemble -> its folder under
``sample_data``. One entry per bundled ensemble: ``demo`` (FLAIR, v prediction, fine-tuned from
the ``demo-t1`` members), ``demo-t1`` (T1, v prediction, trained on the healthy IXI T1 scans in
the MNI frame of ``pseudohealthy preprocess``), ``demo-sample`` (FLAIR, ``sample`` prediction,
from scratch: better on validation and dev data, but it darkened the sample scan; README
"Recipe study, fourth step"),
``demo-scratch`` (the v FLAIR members trained from scratch that ``demo`` replaced) and
``demo-epsilon`` (the epsilon FLAIR members before them), the last two kept for comparison."""


def sample_data_dir() -> Path:
    """The ``sample_data`` folder: inside the installed package, else the checkout's top level."""
    candidates = [
        Path(str(files("pseudohealthy") / "sample_data")),
        Path(__file__).resolve().parents[3] / "sample_data",
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no sample_data folder found (looked in {', '.join(map(str, candidates))})")


def sample_scan_path() -> Path:
    """Path of the bundled FLAIR scan (BraTS 2013 patient 0006, cropped, LPS, 1 mm)."""
    return _existing(sample_data_dir() / SAMPLE_SCAN)


def sample_mask_path() -> Path:
    """Path of the bundled scan's tumour mask (uint8 0/1, same grid)."""
    return _existing(sample_data_dir() / SAMPLE_MASK)


def demo_ensemble_path() -> Path | None:
    """Path of the bundled demo ensemble folder, or None when it is not installed."""
    try:
        path = sample_data_dir() / DEMO_ENSEMBLE
    except FileNotFoundError:
        return None
    return path if path.is_dir() else None


def bundled_ensemble_path(name: str) -> Path:
    """The folder of the bundled ensemble called ``name`` (a key of :data:`BUNDLED_ENSEMBLES`).

    Raises :class:`~pseudohealthy.errors.PseudohealthyError` for an unknown name or a bundled
    ensemble that is not installed.
    """
    if name not in BUNDLED_ENSEMBLES:
        raise PseudohealthyError(f"{name!r} is not a bundled ensemble (bundled: {_bundled_names()})")
    try:
        path = sample_data_dir() / BUNDLED_ENSEMBLES[name]
    except FileNotFoundError as exc:
        raise PseudohealthyError(f"bundled ensemble {name!r} is not installed ({exc})") from None
    if not path.is_dir():
        raise PseudohealthyError(f"bundled ensemble {name!r} is not installed (no folder {path})")
    return path


def resolve_ensemble(name_or_path: str | Path) -> Path:
    """What the user typed for an ensemble -> its path.

    An existing path (an ensemble folder, a member folder or one checkpoint) is returned as
    given, so a folder of the same name as a bundled ensemble wins; otherwise a bundled name
    (``demo``) gives the bundled folder. Anything else raises a
    :class:`~pseudohealthy.errors.PseudohealthyError` in one line that lists the bundled names.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path).strip()
    if name in BUNDLED_ENSEMBLES:
        return bundled_ensemble_path(name)
    raise PseudohealthyError(
        f"{name_or_path}: ensemble not found (no such folder or file, and not the name of a "
        f"bundled ensemble; bundled: {_bundled_names()}, see pseudohealthy sample)"
    )


def copy_sample(dest: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """Copy the bundled scan, mask, demo ensemble (and the data's licence) into folder ``dest``.

    Returns ``{"scan", "mask", "ensemble", "license"} -> copied path``. Every file is written to a
    temporary name and renamed into place, the ensemble folder as a whole (a temporary folder
    renamed), so an interrupted copy leaves no half file or folder under a final name. Nothing
    existing is replaced without ``overwrite`` (checked for all four before anything is copied).
    """
    from pseudohealthy.data.files import atomic_write

    dest = Path(dest)
    ensemble = bundled_ensemble_path("demo")
    sources = {
        "scan": sample_scan_path(),
        "mask": sample_mask_path(),
        "ensemble": ensemble,
        "license": _existing(sample_data_dir() / SAMPLE_LICENSE),
    }
    targets = {key: dest / src.name for key, src in sources.items()}
    existing = [str(t) for t in targets.values() if t.exists() or t.is_symlink()]
    if existing and not overwrite:
        raise PseudohealthyError(f"{', '.join(existing)}: already exist(s) (use --overwrite to replace)")
    dest.mkdir(parents=True, exist_ok=True)
    for key, src in sources.items():
        if src.is_dir():
            _copy_folder(src, targets[key])
        else:
            atomic_write(targets[key], lambda tmp, src=src: shutil.copyfile(src, tmp))
    return targets


def _copy_folder(src: Path, target: Path) -> None:
    """Copy folder ``src`` to a hidden temporary folder beside ``target``, then rename it into
    place (an existing ``target`` is moved aside first and removed after)."""
    from pseudohealthy.data.files import TEMP_MARK

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_MARK, dir=target.parent))
    old: Path | None = None
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True, copy_function=shutil.copyfile)
        if target.exists() or target.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=TEMP_MARK, dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists() and (old / target.name).exists():
            os.replace(old / target.name, target)  # put the old folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def bundled_name(path: str | Path) -> str | None:
    """The :data:`BUNDLED_ENSEMBLES` name of the folder ``path``, None when it is not bundled."""
    try:
        root = sample_data_dir()
    except FileNotFoundError:
        return None
    target = Path(path).resolve()
    for name, folder in BUNDLED_ENSEMBLES.items():
        if (root / folder).resolve() == target:
            return name
    return None


def installed_ensembles() -> dict[str, Path]:
    """The bundled ensembles that are installed: name -> folder, in :data:`BUNDLED_ENSEMBLES`'s
    order (what the viewer offers)."""
    try:
        root = sample_data_dir()
    except FileNotFoundError:
        return {}
    found = {name: root / folder for name, folder in BUNDLED_ENSEMBLES.items()}
    return {name: path for name, path in found.items() if path.is_dir()}


def _bundled_names() -> str:
    return ", ".join(sorted(BUNDLED_ENSEMBLES))


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"bundled sample file missing: {path}")
    return path
