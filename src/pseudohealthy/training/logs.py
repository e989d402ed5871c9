"""What training records as it goes: early stopping on the moving average of the validation
loss with the best validation's scores (:class:`EarlyStop`, part of the resumable state), the
member's ``log.csv`` (:class:`CsvLog`, trimmed to the resumed step), and the optional
tensorboard writer (:func:`open_tensorboard`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pseudohealthy.data.files import write_text
from pseudohealthy.training.config import FIDELITY_FIELDS, LOG_FIELDS

__all__ = ["CsvLog", "EarlyStop", "finite_or_none", "open_tensorboard"]


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a float, or None for None, NaN and infinities (JSON-safe)."""
    return None if x is None or not math.isfinite(x) else float(x)


def _finite_values(values: Mapping[str, float | None] | None) -> dict[str, float | None] | None:
    return None if values is None else {k: finite_or_none(v) for k, v in values.items()}


@dataclass
class EarlyStop:
    """Moving average of the validation loss (``0.9 ma + 0.1 loss``), best value and its step.

    ``best_val_threshold``: the best-Dice threshold of the anomaly maps at the best validation
    (None when validation gives none); ``best_fidelity``: the restorations' fidelity there
    (:data:`~pseudohealthy.training.config.FIDELITY_FIELDS`).
    """

    patience: int = 0
    ma: float | None = None
    best_ma: float | None = None
    best_step: int | None = None
    best_val_loss: float | None = None
    best_val_ap: float | None = None
    best_val_threshold: float | None = None
    best_fidelity: dict[str, float | None] | None = None
    last_val_loss: float | None = None
    last_val_ap: float | None = None
    stopped: bool = False

    def update(
        self,
        step: int,
        val_loss: float,
        val_ap: float | None,
        val_threshold: float | None = None,
        fidelity: Mapping[str, float | None] | None = None,
    ) -> bool:
        """Record a validation; True when it is the new best."""
        self.ma = val_loss if self.ma is None else 0.9 * self.ma + 0.1 * val_loss
        self.last_val_loss, self.last_val_ap = val_loss, val_ap
        if self.best_ma is None or self.ma < self.best_ma:
            self.best_ma, self.best_step = self.ma, step
            self.best_val_loss, self.best_val_ap = val_loss, val_ap
            self.best_val_threshold = val_threshold
            self.best_fidelity = _finite_values(fidelity)
            return True
        return False

    def should_stop(self, step: int) -> bool:
        return bool(self.patience and self.best_step is not None and step - self.best_step >= self.patience)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], patience: int) -> EarlyStop:
        """From :meth:`to_dict`'s output; a field it lacks (an older state) is None."""
        names = {f.name for f in dataclasses.fields(cls)} - {"patience"}
        return cls(patience=patience, **{k: data.get(k) for k in names})


class CsvLog:
    """``log.csv`` (step, loss, val_loss, val_ap, lr, time); a resumed run drops rows past its step.

    The whole file is rewritten atomically on every row (:func:`pseudohealthy.data.files.write_text`),
    so a kill never leaves a torn line.
    """

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        if resume_step is not None and path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                self.rows = [
                    {k: r.get(k, "") or "" for k in LOG_FIELDS}
                    for r in csv.DictReader(fh)
                    if r.get("step", "").isdigit() and int(r["step"]) <= resume_step
                ]
        self._save()

    def write(self, **row: Any) -> None:
        clean = {k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS}
        for k in ("loss", "val_loss", "val_ap", *FIDELITY_FIELDS):
            if isinstance(clean[k], float):
                clean[k] = f"{clean[k]:.6g}" if math.isfinite(clean[k]) else ""
        if isinstance(clean["time"], float):
            clean["time"] = f"{clean['time']:.2f}"
        self.rows.append(clean)
        self._save()

    def _save(self) -> None:
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, LOG_FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, buffer.getvalue())


def open_tensorboard(path: Path) -> Any:
    """A tensorboard ``SummaryWriter`` on ``path``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed
        return None
    return SummaryWriter(str(path))
