"""ONNX fp32 -> static int8 in QDQ format with ONNX Runtime's quantizer. No TensorFlow.

The choices, measured on the zoo CNN (docs/bundle.md has the numbers):

- QDQ format, per-channel int8 weights, MinMax calibration on the calibration set;
- activations uint8 ("U8S8") for CPUs; int8 *symmetric* ("S8S8", zero point 0) for TensorRT,
  which accepts only symmetric int8 Q/DQ;
- ``reduce_range`` (7-bit weights): x86 CPUs without VNNI multiply u8 x s8 pairs with
  VPMADDUBSW, whose int16 sums saturate with full 8-bit weights (ONNX Runtime's quantization
  docs). The shipped file is the evaluated file, so it must be right on any CPU;
- the model's final Softmax/Sigmoid stays float: quantizing the probabilities to 256 levels
  adds ties that cost AUC and blur thresholds, and saves nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["quantize_int8"]


def _final_activations(model_path: Path) -> dict[str, str]:
    """Softmax/Sigmoid nodes that produce a graph output: node name -> op type."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return {
        n.name: n.op_type
        for n in graph.node
        if n.op_type in ("Softmax", "Sigmoid") and set(n.output) & outputs
    }


def quantize_int8(fp32: Path, out: Path, calib: np.ndarray, symmetric: bool = False) -> str:
    """Write the QDQ int8 model of ``fp32`` to ``out``; return a one-line scheme description.

    ``calib`` holds the calibration samples already preprocessed (float32, any shape whose
    per-sample size fits the model's single input).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError("int8 calibration handles models with one input")
    name = inputs[0].name
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in inputs[0].shape]
    if int(np.prod(shape[1:])) != int(np.prod(calib.shape[1:])):
        raise ValueError(
            f"calibration samples of shape {calib.shape[1:]} do not fit ONNX input {shape}"
        )
    samples = calib.reshape((-1, 1, *shape[1:])).astype(np.float32)
    del session

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.i >= len(samples):
                return None
            self.i += 1
            return {name: samples[self.i - 1]}

        def rewind(self) -> None:
            self.i = 0

    keep_float = _final_activations(fp32)
    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=True,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=list(keep_float),
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )
    kind = "S8S8 symmetric (TensorRT)" if symmetric else "U8S8"
    ops = "/".join(sorted(set(keep_float.values())))
    tail = f"; final {ops} kept float" if keep_float else ""
    return (
        f"QDQ {kind}, per-channel 7-bit weights (reduce_range), MinMax on "
        f"{len(samples)} samples{tail}"
    )
