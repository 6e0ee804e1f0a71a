"""The reference model zoo: training code and small trained weights. Uses TensorFlow/Keras for
training only (inside functions); never imported on a device.

Each model is a module ``models.NAME`` with ``SPEC`` (a :class:`models.spec.ZooModel`),
``train()`` and ``python -m models.NAME`` to retrain it. A module with a ``SPEC`` is in the
zoo; :func:`names` lists them by family (CNN, GRU, LSTM, CNN-LSTM, GAN, U-Net), then name."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from models.spec import ZooModel

__all__ = ["DATA_DIR", "REPORTS_DIR", "WEIGHTS_DIR", "ZooModel", "names", "spec", "zoo"]

DATA_DIR = Path(__file__).parent / "data"
WEIGHTS_DIR = Path(__file__).parent / "weights"
REPORTS_DIR = Path(__file__).parent / "reports"  # converter reports that docs/models.md is made of

FAMILIES = ("CNN", "GRU", "CNN-GRU", "LSTM", "CNN-LSTM", "GAN", "U-Net")


def _specs() -> dict[str, ZooModel]:
    found: dict[str, ZooModel] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name == "spec" or info.ispkg:
            continue
        model = getattr(importlib.import_module(f"models.{info.name}"), "SPEC", None)
        if isinstance(model, ZooModel):
            found[info.name] = model
    return found


def names() -> list[str]:
    """The zoo's model names, by family then name."""
    specs = _specs()
    rank = {f: i for i, f in enumerate(FAMILIES)}
    return sorted(specs, key=lambda n: (rank.get(specs[n].family, len(rank)), n))


def spec(name: str) -> ZooModel:
    """The zoo entry ``name``; KeyError names the ones there are."""
    model = _specs().get(name)
    if model is None:
        raise KeyError(f"no zoo model {name!r}; there are: {', '.join(names())}")
    return model


def zoo() -> list[ZooModel]:
    specs = _specs()
    return [specs[n] for n in names()]
