"""The names of the files a restoration writes: one owner for the suffixes, read back by
``evaluate`` (an existing map), the napari reader (how a file is drawn) and ``restore`` itself
(which files of a folder are its own outputs rather than scans).

``<name>`` + :data:`PSEUDO_SUFFIX` (the pseudo-healthy image), :data:`ANOMALY_SUFFIX` (the ensemble
map), :data:`UNCERTAINTY_SUFFIX` (the members' disagreement), :func:`member_map_suffix` (one
member's map, ``restore --member-maps``), :data:`PREVIEW_SUFFIX` and :data:`RECORD_SUFFIX`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pseudohealthy.data.io import is_nifti_name, scan_name

__all__ = [
    "ANOMALY_SUFFIX",
    "MEMBER_MAP_INFIX",
    "PREVIEW_SUFFIX",
    "PSEUDO_SUFFIX",
    "RECORD_SUFFIX",
    "UNCERTAINTY_SUFFIX",
    "MapKind",
    "map_kind",
    "member_map_suffix",
    "output_stems",
]

PSEUDO_SUFFIX = "_pseudohealthy.nii.gz"
ANOMALY_SUFFIX = "_anomaly.nii.gz"
"""An anomaly map's name: the case's name plus this (``pseudohealthy restore`` writes it so)."""
UNCERTAINTY_SUFFIX = "_uncertainty.nii.gz"
MEMBER_MAP_INFIX = "_anomaly_"
PREVIEW_SUFFIX = "_preview.png"
RECORD_SUFFIX = "_restore.json"

MapKind = Literal["anomaly", "member", "uncertainty"]


def member_map_suffix(member: str) -> str:
    """The suffix of one member's anomaly map: ``_anomaly_<member>.nii.gz``."""
    return f"{MEMBER_MAP_INFIX}{member}.nii.gz"


def output_stems() -> tuple[str, ...]:
    """The endings (without ``.nii.gz``/``.png``/``.json``) that mark a file name stem as one of
    ``restore``'s outputs."""
    ends = (PSEUDO_SUFFIX, ANOMALY_SUFFIX, UNCERTAINTY_SUFFIX, PREVIEW_SUFFIX, RECORD_SUFFIX)
    return tuple(e.split(".", 1)[0] for e in ends)


def map_kind(path: str | Path) -> MapKind | None:
    """Which map ``path`` names (``.nii.gz`` or ``.nii``): the ensemble's anomaly map, one
    member's map, the members' disagreement, or None for anything else."""
    if not is_nifti_name(path):
        return None
    stem = scan_name(path)
    if stem.endswith(ANOMALY_SUFFIX.removesuffix(".nii.gz")):
        return "anomaly"
    if stem.endswith(UNCERTAINTY_SUFFIX.removesuffix(".nii.gz")):
        return "uncertainty"
    head, sep, member = stem.rpartition(MEMBER_MAP_INFIX)
    if sep and head and member:
        return "member"
    return None
