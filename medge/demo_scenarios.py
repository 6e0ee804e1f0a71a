"""What ``medge demo`` runs: one scenario per modality, each a zoo model on its stream.

A scenario names its zoo model, the prefix of its devices' names and the source each device
replays (real recorded data shipped in models/data). ``medge demo`` runs every scenario whose
model is in the zoo, one device each; ``--scenario NAME`` runs one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SCENARIOS", "Scenario", "scenario"]


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str  # the zoo model (medge zoo list)
    prefix: str  # device names: PREFIX-01, PREFIX-02, ...
    summary: str
    # (rate_hz, data override) -> the agent's `source:` section
    source: Callable[[float, Path | None], dict[str, Any]]


def _images(model: str) -> Callable[[float, Path | None], dict[str, Any]]:
    def source(rate_hz: float, data: Path | None) -> dict[str, Any]:
        import models

        path = data or models.spec(model).data
        return {"path": path, "split": "val", "rate_hz": rate_hz, "loop": True}

    return source


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "ultrasound",
        "breast_cnn",
        "us",
        "breast ultrasound images through the CNN, with CAM heatmaps",
        _images("breast_cnn"),
    ),
    Scenario(
        "xray",
        "pneumonia_cnn",
        "xr",
        "paediatric chest X-rays through the pneumonia CNN, with CAM heatmaps",
        _images("pneumonia_cnn"),
    ),
)


def scenario(name: str) -> Scenario:
    from edge_agent.errors import MedgeError

    for s in SCENARIOS:
        if s.name == name:
            return s
    raise MedgeError(
        f"no demo scenario {name!r}; there are: {', '.join(s.name for s in SCENARIOS)}"
    )
