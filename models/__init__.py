"""The reference model zoo: training code and small trained weights. Uses TensorFlow/Keras for
training only (inside functions); never imported on a device.

Each model is a module ``models.NAME`` with ``SPEC`` (a :class:`models.spec.ZooModel`),
``train()`` and ``python -m models.NAME`` to retrain it; :data:`NAMES` lists them in the order
``medge zoo list`` shows."""

from __future__ import annotations

import importlib
from pathlib import Path

from models.spec import ZooModel

__all__ = ["DATA_DIR", "NAMES", "REPORTS_DIR", "WEIGHTS_DIR", "ZooModel", "spec", "zoo"]

DATA_DIR = Path(__file__).parent / "data"
WEIGHTS_DIR = Path(__file__).parent / "weights"
REPORTS_DIR = Path(__file__).parent / "reports"  # converter reports that docs/models.md is made of

NAMES: tuple[str, ...] = ("breast_cnn",)


def spec(name: str) -> ZooModel:
    """The zoo entry ``name``; KeyError names the ones there are."""
    if name not in NAMES:
        raise KeyError(f"no zoo model {name!r}; there are: {', '.join(NAMES)}")
    model: ZooModel = importlib.import_module(f"models.{name}").SPEC
    return model


def zoo() -> list[ZooModel]:
    return [spec(n) for n in NAMES]
