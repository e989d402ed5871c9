"""Test sets on disk: the cases (scan, lesion mask, optional brain mask) and their anomaly maps.

Owns how a test set is given (:func:`cases_from_lists`, :func:`cases_from_csv`,
:func:`cases_from_dir`), the unique name of each :class:`Case` (:func:`unique_names`) and where a
case's existing anomaly map is found (:func:`find_restoration`, ``<name>`` + :data:`ANOMALY_SUFFIX`).
Nothing here reads voxels: loading a case and its map is :mod:`.cases`.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pseudohealthy.data.io import is_dicom_folder, is_nifti_name, scan_name
from pseudohealthy.engine.outputs import ANOMALY_SUFFIX
from pseudohealthy.errors import PseudohealthyError

__all__ = [
    "ANOMALY_SUFFIX",
    "Case",
    "cases_from_csv",
    "cases_from_dir",
    "cases_from_lists",
    "find_restoration",
    "unique_names",
]


@dataclass
class Case:
    """One test scan with its lesion mask (and optional brain mask); ``name`` is unique in a set."""

    scan: Path
    mask: Path
    brain_mask: Path | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.scan, self.mask = Path(self.scan), Path(self.mask)
        self.brain_mask = Path(self.brain_mask) if self.brain_mask else None
        self.name = self.name or scan_name(self.scan)


def unique_names(cases: list[Case]) -> list[Case]:
    """Prefix the parent folder's name where scan names repeat (``patient07_FLAIR``)."""
    counts = Counter(c.name for c in cases)
    for c in cases:
        if counts[c.name] > 1:
            c.name = f"{c.scan.parent.name}_{c.name}"
    dupes = [n for n, k in Counter(c.name for c in cases).items() if k > 1]
    if dupes:
        raise PseudohealthyError(f"scans listed twice or ambiguous names: {', '.join(dupes)}")
    return cases


def cases_from_lists(
    scans: list[Path], masks: list[Path], brain_masks: list[Path] | None = None
) -> list[Case]:
    """Pair scans with masks (and brain masks) by position."""
    if len(scans) != len(masks):
        raise PseudohealthyError(f"{len(scans)} scans but {len(masks)} masks: give one mask per scan")
    if brain_masks and len(brain_masks) != len(scans):
        raise PseudohealthyError(f"{len(scans)} scans but {len(brain_masks)} brain masks")
    brains = brain_masks or [None] * len(scans)
    return unique_names([Case(s, m, b) for s, m, b in zip(scans, masks, brains, strict=True)])


def cases_from_csv(path: str | Path) -> list[Case]:
    """Rows ``scan,mask[,brain_mask]`` (an optional header row starting with ``scan``); relative
    paths are taken from the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise PseudohealthyError(f"{path}: pairs file not found")
    cases = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.reader(fh), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#") or (i == 1 and cells[0].lower() == "scan"):
                continue
            if len(cells) < 2 or not cells[0] or not cells[1]:
                raise PseudohealthyError(f"{path}, line {i}: expected 'scan,mask[,brain_mask]', got {row}")
            paths = [path.parent / c if c else None for c in cells[:3]]
            cases.append(Case(*paths))
    if not cases:
        raise PseudohealthyError(f"{path}: no scan,mask rows")
    return unique_names(cases)


def cases_from_dir(
    folder: str | Path, scan_glob: str, mask_name: str, brain_mask_name: str | None = None
) -> list[Case]:
    """NIfTI scans (or folders holding a DICOM series) matching ``scan_glob`` under ``folder``;
    the mask is ``mask_name`` beside each scan."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PseudohealthyError(f"{folder}: dataset folder not found")
    scans = sorted(
        p for p in folder.glob(scan_glob) if (p.is_file() and is_nifti_name(p)) or is_dicom_folder(p)
    )
    if not scans:
        raise PseudohealthyError(f"{folder}: no NIfTI file (or DICOM series folder) matches {scan_glob!r}")
    cases = []
    for scan in scans:
        brain = scan.parent / brain_mask_name if brain_mask_name else None
        cases.append(Case(scan, scan.parent / mask_name, brain))
    return unique_names(cases)


def find_restoration(case: Case, folder: str | Path | None) -> Path | None:
    """``<name>_anomaly.nii.gz`` (or ``.nii``) for ``case`` in ``folder``; also tried:
    ``<parent folder>/<scan name>_anomaly...`` and, when the case was not renamed for
    uniqueness, ``<scan name>_anomaly...``."""
    if folder is None:
        return None
    folder = Path(folder)
    base = scan_name(case.scan)
    candidates = [
        folder / f"{case.name}{ANOMALY_SUFFIX}",
        folder / case.scan.parent.name / f"{base}{ANOMALY_SUFFIX}",
    ]
    if case.name == base:
        candidates.append(folder / f"{base}{ANOMALY_SUFFIX}")
    candidates += [c.with_name(c.name[: -len(".gz")]) for c in candidates]
    return next((c for c in candidates if c.is_file()), None)
