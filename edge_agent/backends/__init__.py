"""Inference backends, chosen by a key. Each one reads its tensors from the model itself."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from edge_agent.bundle import TensorSpec
from edge_agent.errors import BackendError

__all__ = ["Backend", "open_backend"]


class Backend(Protocol):
    """A loaded model: its tensors as the runtime sees them, and one call."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def invoke(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run once on already-shaped, already-quantized inputs; return raw outputs."""
        ...


def open_backend(runtime: str, model: Path, threads: int = 1) -> Backend:
    """Load ``model`` with the backend for ``runtime`` ('litert' or 'onnx')."""
    if runtime == "litert":
        from edge_agent.backends.litert import LiteRTBackend

        return LiteRTBackend(model, threads=threads)
    if runtime == "onnx":
        from edge_agent.backends.onnx import OnnxBackend

        return OnnxBackend(model, threads=threads)
    raise BackendError(f"no backend for runtime '{runtime}' (available: litert, onnx)")
