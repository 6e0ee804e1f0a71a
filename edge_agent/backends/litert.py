"""LiteRT (TensorFlow Lite) backend: ai-edge-litert, else tflite-runtime (numpy < 2 only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle import Quantization, TensorSpec
from edge_agent.errors import BackendError

__all__ = ["LiteRTBackend"]


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter

        return Interpreter
    except ImportError as exc:
        raise BackendError(
            "LiteRT runtime not installed: pip install 'medge[device]' (ai-edge-litert)"
        ) from exc


def _spec(detail: dict[str, Any]) -> TensorSpec:
    scale, zero = detail.get("quantization", (0.0, 0))
    quant = Quantization(scale=float(scale), zero_point=int(zero)) if scale else None
    return TensorSpec(
        name=str(detail["name"]),
        shape=[int(d) for d in detail["shape"]],
        dtype=np.dtype(detail["dtype"]).name,
        quantization=quant,
    )


class LiteRTBackend:
    name = "litert"

    def __init__(self, model: Path, threads: int = 1) -> None:
        interpreter_cls = _interpreter_class()
        try:
            self._interp = interpreter_cls(model_path=str(model), num_threads=threads)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackendError(f"LiteRT cannot load {model.name}: {first}") from exc
        self._in = self._interp.get_input_details()
        self._out = self._interp.get_output_details()
        self.inputs = [_spec(d) for d in self._in]
        self.outputs = [_spec(d) for d in self._out]

    def invoke(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        # Each call is one independent sample. LiteRT's fused LSTM/RNN ops keep their state in
        # variable tensors across invokes; zero them so no sample sees the one before it.
        self._interp.reset_all_variables()
        for detail, x in zip(self._in, inputs, strict=True):
            self._interp.set_tensor(detail["index"], x)
        self._interp.invoke()
        return [self._interp.get_tensor(d["index"]).copy() for d in self._out]
