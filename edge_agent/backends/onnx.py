"""ONNX Runtime backend (CPU execution provider): fp32 models and QDQ-quantized int8 models.

onnxruntime is imported only when this backend is opened, so a LiteRT-only device never
loads it. A QDQ int8 model keeps float32 graph inputs and outputs (the Quantize/Dequantize
nodes sit inside the graph), so its tensors carry no quantization here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.bundle import TensorSpec
from edge_agent.errors import BackendError

__all__ = ["OnnxBackend"]

# ONNX Runtime's type strings for the dtypes a manifest can describe.
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
}
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*")


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError(
            "ONNX Runtime not installed: pip install 'medge[device-onnx]' (onnxruntime)"
        ) from exc
    return onnxruntime


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return _ORT_PREFIX.sub("", text.splitlines()[0]) if text else type(exc).__name__


def _spec(model: Path, arg: Any) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise BackendError(f"{model.name}: tensor '{arg.name}' has unsupported type {arg.type}")
    shape = []
    for axis, dim in enumerate(arg.shape):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif axis == 0:
            shape.append(1)  # a symbolic batch axis: the agent runs one sample at a time
        else:
            raise BackendError(
                f"{model.name}: tensor '{arg.name}' has a dynamic axis {axis} ({dim!r}); "
                "export the model with a fixed input shape"
            )
    return TensorSpec(name=str(arg.name), shape=shape, dtype=dtype)  # type: ignore[arg-type]


class OnnxBackend:
    name = "onnx"

    def __init__(self, model: Path, threads: int = 1) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only: warnings would go to the device's stderr
        try:
            self._session = ort.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own exceptions derive from Exception only
            raise BackendError(
                f"ONNX Runtime cannot load {model.name}: {_first_line(exc)}"
            ) from exc
        self._model = model
        self.inputs = [_spec(model, a) for a in self._session.get_inputs()]
        self.outputs = [_spec(model, a) for a in self._session.get_outputs()]
        self._in_names = [t.name for t in self.inputs]
        self._out_names = [t.name for t in self.outputs]

    def invoke(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = dict(zip(self._in_names, inputs, strict=True))
        try:
            outs = self._session.run(self._out_names, feed)
        except Exception as exc:
            raise BackendError(
                f"ONNX Runtime failed on {self._model.name}: {_first_line(exc)}"
            ) from exc
        return [np.asarray(o) for o in outs]
