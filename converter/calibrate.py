"""int8 calibration, for LiteRT and for ONNX: the representative data and the settings.

- The calibration set is the request's calibration samples through the device's own
  preprocessing (converter.data.prepare), written once per conversion as ``calib.npy`` and read
  by every child process; :func:`calibration_warnings` says what is wrong with it
  (converter.calibration_check: too small, missing classes, unlike the evaluation data,
  BatchNorm statistics that do not match — the last in its own child process).
- LiteRT: :func:`litert_int8` sets a ``TFLiteConverter`` for full int8 (int8 ops only, int8
  input and output), int8 with float fallback ops, dynamic range (no calibration) or 16x8, fed
  one sample at a time by :func:`representative_dataset`. It runs in the conversion child
  (converter.child.litert), where TensorFlow is imported.
- ONNX: :func:`quantize_onnx_int8` is ONNX Runtime's static QDQ quantization. The choices,
  measured on the zoo CNN (docs/bundle.md has the numbers): per-channel int8 weights, MinMax
  calibration on the calibration set; activations uint8 ("U8S8") for CPUs, int8 *symmetric*
  ("S8S8", zero point 0) for TensorRT, which accepts only symmetric int8 Q/DQ;
  ``reduce_range`` (7-bit weights): x86 CPUs without VNNI multiply u8 x s8 pairs with
  VPMADDUBSW, whose int16 sums saturate with full 8-bit weights (ONNX Runtime's quantization
  docs) — the shipped file is the evaluated file, so it must be right on any CPU; the model's
  final Softmax/Sigmoid stays float: quantizing the probabilities to 256 levels adds ties that
  cost AUC and blur thresholds, and saves nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converter.calibration_check import MIN_CALIBRATION, check_calibration, has_batchnorm
from converter.errors import ConversionError
from converter.runner import run_child

if TYPE_CHECKING:
    from converter.data import Data

__all__ = [
    "MIN_CALIBRATION",
    "calibration_warnings",
    "litert_int8",
    "quantize_onnx_int8",
    "representative_dataset",
    "too_few",
]


def too_few(n: int) -> list[str]:
    """The warning for a calibration set of ``n`` samples, when it is too small."""
    if n >= MIN_CALIBRATION:
        return []
    return [
        f"calibration set has only {n} samples (< {MIN_CALIBRATION}); "
        "int8 ranges may not represent the data"
    ]


def representative_dataset(calib: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """LiteRT's representative dataset: each calibration sample as a batch of one."""

    def representative() -> Iterator[list[np.ndarray]]:
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    return representative


def litert_int8(converter: Any, calib: np.ndarray | None, ops: str, int8_io: bool = False) -> Any:
    """Set a ``TFLiteConverter`` for quantization (in the child: imports TensorFlow).

    ``ops``: ``int8`` (int8 builtins only), ``int8+float`` (int8 where LiteRT has a kernel,
    float elsewhere), ``dynamic`` (int8 weights, float activations: no calibration),
    ``int16x8`` (16-bit activations, 8-bit weights) or ``default`` (the default int8
    optimization with ``calib``: what QuantizationDebugger starts from). ``int8_io``: int8
    input and output tensors."""
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if ops != "dynamic":
        assert calib is not None
        converter.representative_dataset = representative_dataset(calib)
    if ops == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif ops == "int8+float":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
    elif ops == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return converter


def calibration_warnings(model: Path, data: Data, work: Path) -> list[str]:
    """converter.calibration_check's warnings: a small, class-incomplete or unrepresentative
    calibration set (numpy, here), and BatchNorm statistics against the data (TensorFlow, in
    its child process, only for a Keras model that has BatchNormalization layers). ``work``
    holds ``calib.npy`` and ``eval.npy``, the prepared samples."""
    n_classes = len(data.labels) if data.yc is not None else None
    calib, evalx = np.load(work / "calib.npy"), np.load(work / "eval.npy")
    if data.layout == "NCHW":  # the checks read channels on the last axis
        calib, evalx = np.moveaxis(calib, 1, -1), np.moveaxis(evalx, 1, -1)
    found = check_calibration(calib, evalx, calib_y=data.yc, n_classes=n_classes)
    keras_file = model.suffix.lower() in (".keras", ".h5")  # what the BN check can load
    if not keras_file or has_batchnorm(model) is False:
        return found
    job = {"model": str(model), "calib": str(work / "calib.npy"), "out": str(work / "bn.json")}
    try:
        run_child(job, work, "converter.child.batchnorm", "BatchNormalization check")
        return found + list(json.loads((work / "bn.json").read_text()))
    except (ConversionError, OSError, ValueError) as exc:  # the check must not cost the bundle
        return [*found, f"calibration check failed: {exc}"]


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


def quantize_onnx_int8(fp32: Path, out: Path, calib: np.ndarray, symmetric: bool = False) -> str:
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
