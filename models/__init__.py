"""The reference model zoo: training code and small trained weights. Uses TensorFlow/Keras;
never imported on a device."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DATA_DIR", "WEIGHTS_DIR"]

DATA_DIR = Path(__file__).parent / "data"
WEIGHTS_DIR = Path(__file__).parent / "weights"
