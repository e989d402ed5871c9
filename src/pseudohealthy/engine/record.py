"""The record of one restoration run, in one shape for ``restore.json`` and the viewer's layers.

A :class:`RunRecord` is started from the ensemble and the resolved settings, grows by one
:class:`~pseudohealthy.engine.restore.SliceResult` at a time (:meth:`RunRecord.add`, so a viewer
that streams slices keeps the same record as a whole-volume run) and turns into JSON-ready data
with :meth:`RunRecord.to_dict` (and back with :meth:`RunRecord.from_dict`). The volume score is
:func:`~pseudohealthy.engine.maps.volume_score` of the slice scores, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pseudohealthy.engine.maps import volume_score

if TYPE_CHECKING:
    from pseudohealthy.engine.restore import SliceResult
    from pseudohealthy.model.checkpoint import Ensemble

__all__ = ["RUN_KEYS", "RunRecord"]

RUN_KEYS = ("sampler", "steps", "seed", "t_start", "faithful_ssim", "norm", "square", "spacing")
"""Settings that make two runs' slices comparable (device, batch size, precision and compile
change only the speed, within float tolerance)."""


@dataclass
class RunRecord:
    """One run: which ensemble and settings, and per restored slice its score, seeds and time.

    ``settings`` holds what the run used (the restore settings plus the resolved ``n_steps``,
    ``t_start``, ``image_size``, ``norm``, ``square`` and ``autocast``). Slice keys are canonical
    axial indices. ``uncertainty_scores``: per slice, the mean of the members' disagreement.
    ``timings`` holds run-level seconds (``total_s``, ``prepare_s``).
    """

    ensemble: str
    members: list[dict[str, Any]]
    settings: dict[str, Any]
    device: str
    slice_scores: dict[int, float] = field(default_factory=dict)
    member_scores: dict[int, list[float]] = field(default_factory=dict)
    seeds: dict[int, list[int]] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    uncertainty_scores: dict[int, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    completed: bool = False

    @classmethod
    def start(cls, ensemble: Ensemble, settings: dict[str, Any], device: str) -> RunRecord:
        """An empty record of a run of ``ensemble`` with the resolved ``settings`` on ``device``."""
        return cls(str(ensemble.path or ""), ensemble.describe(), dict(settings), str(device))

    @property
    def member_names(self) -> list[str]:
        return [str(m.get("name")) for m in self.members]

    @property
    def restored(self) -> list[int]:
        """Restored slices, in the order they were restored."""
        return list(self.slice_scores)

    @property
    def volume_score(self) -> float | None:
        """The mean of the restored slices' scores (None before any slice is restored)."""
        return volume_score(self.slice_scores.values())

    def add(self, result: SliceResult) -> None:
        """Record one restored slice (a slice restored again replaces its earlier entry)."""
        k = int(result.index)
        self.slice_scores[k] = float(result.score)
        self.member_scores[k] = [float(s) for s in result.member_scores]
        self.seeds[k] = [int(s) for s in result.seeds]
        self.seconds[k] = float(result.seconds)
        self.uncertainty_scores[k] = float(result.uncertainty_score)

    def run_key(self) -> dict[str, Any]:
        """What must agree for slices of two runs to belong to one result."""
        return {
            "ensemble": self.ensemble,
            "members": self.member_names,
            **{k: self.settings.get(k) for k in RUN_KEYS},
        }

    def same_run(self, other: RunRecord) -> bool:
        """True when ``other``'s slices may be combined with this run's (see :data:`RUN_KEYS`)."""
        return self.run_key() == other.run_key()

    def keep_from(self, other: RunRecord, skip: set[int] | frozenset[int] = frozenset()) -> None:
        """Take over ``other``'s slices (except ``skip``) when it is the same run."""
        if not self.same_run(other):
            return
        for k in other.restored:
            if k in skip or k in self.slice_scores:
                continue
            self.slice_scores[k] = other.slice_scores[k]
            self.member_scores[k] = list(other.member_scores.get(k, []))
            self.seeds[k] = list(other.seeds.get(k, []))
            self.seconds[k] = other.seconds.get(k, 0.0)
            if k in other.uncertainty_scores:
                self.uncertainty_scores[k] = other.uncertainty_scores[k]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (slice keys as strings, ascending)."""

        def by_slice(values: dict[int, Any]) -> dict[str, Any]:
            return {str(k): values[k] for k in sorted(values)}

        mean = sum(self.seconds.values()) / len(self.seconds) if self.seconds else 0.0
        return {
            "ensemble": {"path": self.ensemble, "members": self.members},
            "device": self.device,
            "settings": self.settings,
            "volume_score": self.volume_score,
            "slice_scores": by_slice(self.slice_scores),
            "member_scores": by_slice(self.member_scores),
            "uncertainty_scores": by_slice(self.uncertainty_scores),
            "restored_slices": sorted(self.restored),
            "seeds": by_slice(self.seeds),
            "timings": {**self.timings, "mean_per_slice_s": mean, "per_slice_s": by_slice(self.seconds)},
            "completed": self.completed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        """Inverse of :meth:`to_dict` (missing parts come back empty)."""

        def by_int(values: Any) -> dict[int, Any]:
            return {int(k): v for k, v in (values or {}).items()}

        ensemble = data.get("ensemble") or {}
        timings = dict(data.get("timings") or {})
        seconds = by_int(timings.pop("per_slice_s", {}))
        timings.pop("mean_per_slice_s", None)
        return cls(
            ensemble=str(ensemble.get("path", "")),
            members=list(ensemble.get("members") or []),
            settings=dict(data.get("settings") or {}),
            device=str(data.get("device", "")),
            slice_scores={k: float(v) for k, v in by_int(data.get("slice_scores")).items()},
            member_scores={k: [float(s) for s in v] for k, v in by_int(data.get("member_scores")).items()},
            seeds={k: [int(s) for s in v] for k, v in by_int(data.get("seeds")).items()},
            seconds={k: float(v) for k, v in seconds.items()},
            uncertainty_scores={k: float(v) for k, v in by_int(data.get("uncertainty_scores")).items()},
            timings={k: float(v) for k, v in timings.items()},
            completed=bool(data.get("completed", False)),
        )
