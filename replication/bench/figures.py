"""Figures: one measured value, the baseline measured beside it, and the goal.

Every number ``replication bench`` reports is a :class:`Figure`. The ratio is
always ``value / baseline`` (both in the same unit, measured in the same run on
the same machine), and a :class:`Target` states the goal either on that ratio
("at least 0.70 of the bare relay's throughput") or on the value itself ("peak
RSS under 256 MiB"). A figure whose baseline tool is missing keeps its value and
says what is missing; its ratio and verdict are then ``None``, never invented.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

__all__ = ["Figure", "Target"]

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


@dataclass(frozen=True)
class Target:
    """A goal: ``on`` ("ratio" or "value") compared with ``limit`` by ``op``."""

    on: str
    op: str
    limit: float
    why: str = ""  # where the goal comes from

    def __post_init__(self) -> None:
        if self.on not in ("ratio", "value") or self.op not in _OPS:
            raise ValueError(f"bad target {self.on} {self.op} {self.limit}")

    def met(self, value: float | None, ratio: float | None) -> bool | None:
        """Return whether the goal holds, or None when the compared number is unknown."""
        subject = ratio if self.on == "ratio" else value
        if subject is None:
            return None
        return bool(_OPS[self.op](subject, self.limit))

    def __str__(self) -> str:
        return f"{self.on} {self.op} {self.limit:g}"

    def to_dict(self) -> dict[str, object]:
        return {"on": self.on, "op": self.op, "limit": self.limit, "why": self.why}


@dataclass(frozen=True)
class Figure:
    """One measured value of a stage, with its baseline and its goal."""

    stage: str
    name: str
    unit: str
    value: float | None
    baseline: float | None
    baseline_name: str
    target: Target
    missing: str | None = None  # the tool (or stage) whose absence left a gap
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Return value / baseline, or None when either is unknown (or the baseline is 0)."""
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        """Return whether the target is met; None when it cannot be judged."""
        return self.target.met(self.value, self.ratio)

    def to_dict(self) -> dict[str, object]:
        """Return the figure as a JSON-friendly record (the report's schema)."""
        ratio = self.ratio
        return {
            "stage": self.stage,
            "name": self.name,
            "unit": self.unit,
            "value": _round(self.value),
            "baseline": _round(self.baseline),
            "baseline_name": self.baseline_name,
            "ratio": _round(ratio),
            "target": self.target.to_dict(),
            "met": self.met,
            "missing": self.missing,
            "note": self.note,
        }


def _round(x: float | None) -> float | None:
    """Keep 6 significant digits (a time of 0.0089 s must not lose its precision)."""
    return None if x is None else float(f"{x:.6g}")
