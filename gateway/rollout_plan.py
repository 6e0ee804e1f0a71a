"""What a staged rollout is asked to do (docs/rollouts.md): its stages and its gates, parsed
from the flags of ``medge gateway rollout start`` and kept as JSON in the ``rollouts`` table.
Plain functions and values: the driver (gateway.rollout) and the status read them.

- stages: ``canary`` devices first, then each step, a cumulative share of the group
  (``10%,50%,100%``); a step that adds no device is left out;
- gates: ``agreement>=0.98,alerts_per_hour<=2``; a gate names one measure, one of
  ``>= <= > <`` and a number. ``agreement``, ``dice`` (segmentation models) and
  ``shadow_p99_ms`` are measured on the shadow run (before the switch), ``alerts_per_hour``
  after it.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_agent.errors import MedgeError

__all__ = [
    "GATE_MEASURES",
    "Gate",
    "Plan",
    "RolloutError",
    "parse_gates",
    "parse_steps",
    "stage_sizes",
]

# measure -> the phase it is measured in
GATE_MEASURES = {
    "agreement": "shadow",
    "dice": "shadow",  # segmentation: the candidate's masks against the published ones
    "shadow_p99_ms": "shadow",
    "alerts_per_hour": "after",
}
_GATE = re.compile(r"^\s*([a-z_0-9]+)\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")


class RolloutError(MedgeError):
    """A rollout request or command that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class Gate:
    """``measure op threshold``, e.g. ``agreement >= 0.98``."""

    measure: str
    op: str
    threshold: float

    @property
    def phase(self) -> str:
        return GATE_MEASURES[self.measure]

    def holds(self, value: float | None) -> bool:
        """Whether the measured ``value`` passes; a value not measured (None) never does."""
        if value is None or math.isnan(value):
            return False
        t = self.threshold
        return {">=": value >= t, "<=": value <= t, ">": value > t, "<": value < t}[self.op]

    def __str__(self) -> str:
        return f"{self.measure}{self.op}{self.threshold:g}"


def parse_gates(text: str) -> list[Gate]:
    """``agreement>=0.98,alerts_per_hour<=2`` -> gates; RolloutError names a bad one."""
    gates = []
    for part in filter(str.strip, text.split(",")):
        m = _GATE.match(part)
        if m is None:
            raise RolloutError(f"--gate {part.strip()!r}: expected MEASURE>=NUMBER (or <=, >, <)")
        measure, op, value = m.group(1), m.group(2), float(m.group(3))
        if measure not in GATE_MEASURES:
            known = ", ".join(sorted(GATE_MEASURES))
            raise RolloutError(f"--gate {part.strip()!r}: unknown measure (known: {known})")
        gates.append(Gate(measure, op, value))
    return gates


def parse_steps(text: str) -> list[float]:
    """``10%,50%,100%`` -> [10.0, 50.0, 100.0]: rising percentages in (0, 100]."""
    steps: list[float] = []
    for part in filter(str.strip, text.split(",")):
        raw = part.strip().removesuffix("%")
        try:
            pct = float(raw)
        except ValueError:
            raise RolloutError(
                f"--steps {part.strip()!r}: expected a percentage like 50%"
            ) from None
        if not 0 < pct <= 100 or (steps and pct <= steps[-1]):
            raise RolloutError(
                f"--steps {text!r}: percentages must rise, each above 0 and at most 100"
            )
        steps.append(pct)
    return steps


def stage_sizes(total: int, canary: int, steps: list[float]) -> list[tuple[str, int]]:
    """(name, cumulative device count) per stage, stages that add no device left out: 10
    devices, canary 2, steps 10%,50%,100% -> [("canary", 2), ("50%", 5), ("100%", 10)]. A
    step's count is the percentage of ``total`` rounded up."""
    out: list[tuple[str, int]] = []
    done = 0
    wanted = [("canary", min(canary, total))] if canary > 0 else []
    wanted += [(f"{p:g}%", min(total, math.ceil(total * p / 100 - 1e-9))) for p in steps]
    for name, count in wanted:
        if count > done:
            out.append((name, count))
            done = count
    return out


@dataclass(frozen=True)
class Plan:
    """Everything ``rollout start`` was asked, as stored (``to_json``/``of_json``)."""

    canary: int = 2
    steps: list[float] = field(default_factory=lambda: [10.0, 50.0, 100.0])
    gates: list[Gate] = field(default_factory=list)
    min_results: int = 200
    shadow: bool = True
    shadow_share: float = 0.25
    cpu_budget: float = 0.5
    allow_downgrade: bool = False

    def check(self) -> Plan:
        """RolloutError for what the device contract or the stages cannot take."""
        if self.canary < 0:
            raise RolloutError("--canary must be 0 or more")
        if self.canary == 0 and not self.steps:
            raise RolloutError("no stage: give --canary N or --steps")
        if self.min_results < 1:
            raise RolloutError("--min-results must be 1 or more")
        if not 0 < self.shadow_share <= 1:
            raise RolloutError("--shadow-share must be above 0 and at most 1")
        if not 0 < self.cpu_budget <= 4:
            raise RolloutError("--cpu-budget must be above 0 and at most 4")
        if not self.shadow:
            shadowed = [str(g) for g in self.gates if g.phase == "shadow"]
            if shadowed:
                raise RolloutError(
                    f"--gate {','.join(shadowed)} is measured on the shadow run: not with "
                    "--no-shadow"
                )
        return self

    def gates_of(self, phase: str) -> list[Gate]:
        return [g for g in self.gates if g.phase == phase]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["gates"] = [str(g) for g in self.gates]
        return doc

    @classmethod
    def of_json(cls, doc: dict[str, Any]) -> Plan:
        return cls(**{**doc, "gates": parse_gates(",".join(doc.get("gates", [])))})
