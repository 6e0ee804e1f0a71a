"""Runs in a child process: Keras/SavedModel -> ONNX fp32, or ONNX fp32 -> QDQ int8.

    python -m converter.child.onnx export JOB.json     # TensorFlow + tf2onnx
    python -m converter.child.onnx quantize JOB.json   # ONNX Runtime only, no TensorFlow

Like converter.child.litert, a crash here kills only this process. On a problem we print one
line to stderr and exit 3. ``export`` writes a small JSON result naming the route that worked.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

EXIT_INPUT = 3
OPSET = 17  # the newest opset TensorRT 8.5 (JetPack 5) parses; ONNX Runtime reads it too


def _fail(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(EXIT_INPUT)


def _first(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def export(job: dict[str, Any]) -> None:
    """Keras -> ONNX fp32 with a fixed batch-of-one input, as the agent runs it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError as exc:
        _fail(f"tf2onnx not installed ({exc}): pip install 'medge[convert]'")
    except Exception as exc:  # e.g. a protobuf it does not support
        _fail(f"tf2onnx cannot be imported: {_first(exc)}")

    from converter.child.models import load_model

    fmt = job.get("format", "keras")
    try:
        model = load_model(job["model"], fmt)
    except Exception as exc:
        what = "Keras" if fmt in ("keras", "h5") else fmt
        _fail(f"cannot load {what} model {Path(job['model']).name}: {_first(exc)}")
    if len(model.inputs) != 1:  # several outputs are fine: the CAM is the second one
        _fail("ONNX export handles models with one input")
    shape = (1, *(int(d) for d in model.inputs[0].shape[1:]))
    name = str(getattr(model.inputs[0], "name", "") or "input").split(":")[0]
    signature = (tf.TensorSpec(shape, tf.float32, name=name),)
    out = job["onnx_out"]
    # Route 1: tf2onnx's own Keras entry point (1.17 traces Keras 3 models through tf.function).
    # Route 2: trace model(x, training=False) ourselves, for models from_keras cannot walk.
    try:
        if not isinstance(model, keras.Model):  # a SavedModel signature, a tf_keras model
            raise TypeError(f"not a Keras 3 model ({fmt})")
        tf2onnx.convert.from_keras(model, input_signature=signature, opset=OPSET, output_path=out)
        route = "tf2onnx.convert.from_keras"
    except Exception as first_exc:
        fn = tf.function(lambda x: model(x, training=False), input_signature=signature)
        try:
            tf2onnx.convert.from_function(
                fn, input_signature=signature, opset=OPSET, output_path=out
            )
        except Exception as exc:
            _fail(f"tf2onnx refused the model: {_first(first_exc)}; then {_first(exc)}")
        route = "tf2onnx.convert.from_function"
    Path(job["result_out"]).write_text(json.dumps({"route": route, "opset": OPSET}))


def quantize(job: dict[str, Any]) -> None:
    from converter.calibrate import quantize_onnx_int8

    calib = np.load(job["calib"])
    try:
        scheme = quantize_onnx_int8(
            Path(job["fp32"]), Path(job["int8_out"]), calib, symmetric=bool(job["symmetric"])
        )
    except ValueError as exc:
        _fail(str(exc))
    except Exception as exc:
        _fail(f"ONNX Runtime quantization failed: {_first(exc)}")
    Path(job["result_out"]).write_text(json.dumps({"scheme": scheme}))


def main(step: str, job_path: str) -> None:
    logging.basicConfig(level=logging.ERROR)  # tf2onnx and the quantizer are chatty at INFO
    job = json.loads(Path(job_path).read_text())
    if step == "export":
        export(job)
    elif step == "quantize":
        quantize(job)
    else:
        _fail(f"unknown step '{step}' (export or quantize)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
