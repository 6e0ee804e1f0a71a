"""Runs in a child process: Keras model -> full-int8 LiteRT, plus float predictions.

    python -m converter.litert_child JOB.json

A crash here (the TFLite converter can segfault on recurrent models) kills only this process;
the parent reports it and moves on. On a problem we print one line to stderr and exit 3.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

EXIT_INPUT = 3


def _fail(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(EXIT_INPUT)


def main(job_path: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    job = json.loads(Path(job_path).read_text())
    import keras
    import tensorflow as tf

    try:
        model = keras.saving.load_model(job["model"], compile=False)
    except Exception as exc:
        _fail(f"cannot load Keras model {Path(job['model']).name}: {type(exc).__name__}: {exc}")
    in_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    calib = np.load(job["calib"])
    evalx = np.load(job["eval"])
    for name, arr in (("calibration", calib), ("evaluation", evalx)):
        if int(np.prod(arr.shape[1:])) != int(np.prod(in_shape)):
            _fail(f"{name} samples of shape {arr.shape[1:]} do not fit model input {in_shape}")
    calib = calib.reshape((-1, *in_shape)).astype(np.float32)
    evalx = evalx.reshape((-1, *in_shape)).astype(np.float32)
    n_out = int(model.outputs[0].shape[-1])
    if (
        job.get("n_labels")
        and job["n_labels"] != n_out
        and not (n_out == 1 and job["n_labels"] == 2)
    ):
        _fail(f"model has {n_out} outputs but {job['n_labels']} labels were given")

    probs = model.predict(evalx, batch_size=64, verbose=0)
    np.save(job["float_out"], probs.astype(np.float32))

    def representative():  # type: ignore[no-untyped-def]
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    try:
        flat = converter.convert()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _fail(f"TFLite converter refused the model: {first}")
    Path(job["tflite_out"]).write_bytes(flat)


if __name__ == "__main__":
    main(sys.argv[1])
