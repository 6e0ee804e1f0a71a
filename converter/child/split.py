"""Split a clip model at its per-frame front into a feature model and a temporal model (child
process, Keras).

    python -m converter.child.split JOB.json

The job: ``model`` (.keras whose first layer is a TimeDistributed wrapper, then a chain of
layers), ``calib`` and ``eval`` (.npy clips (N, T, H, W, C), preprocessed), and where to write
``feature`` (.keras: one frame -> its feature vector), ``temporal`` (.keras, batch 1: (T, F)
-> the model's output), ``calib_features``/``eval_features`` (float features, (N, T, F)),
``float_out`` (the whole model's output on ``eval``) and ``info`` (JSON: frames, features,
the wrapper's name, and how far the split's output is from the whole model's on ``eval``).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

SPLIT_TOLERANCE = 1e-4  # the composed models must give the whole model's outputs


def _fail(msg: str) -> NoReturn:
    print(msg, file=sys.stderr)
    sys.exit(2)


def _chain(model: Any) -> list[Any]:
    """The model's layers after its input, checked to be one chain that starts with a
    TimeDistributed wrapper."""
    import keras

    body = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not body or not isinstance(body[0], keras.layers.TimeDistributed):
        first = type(body[0]).__name__ if body else "nothing"
        _fail(f"a feature stage needs a model whose first layer is TimeDistributed (has {first})")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        _fail("a feature stage needs a model of one input and one output")
    for before, layer in itertools.pairwise(body):
        if len(layer._inbound_nodes) != 1 or layer.input is not before.output:
            _fail(f"a feature stage needs one chain of layers: '{layer.name}' is not fed by "
                  f"'{before.name}' alone")  # fmt: skip
    return body


def _load(path: str) -> Any:
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:
        _fail(f"cannot load Keras model {Path(path).name}: {type(exc).__name__}: {exc}")


def _parts(model: Any) -> tuple[Any, Any, int, list[Any]]:
    """(feature model, temporal model builder(batch), frames, the per-frame layers)."""
    import keras

    body = _chain(model)
    front = 0
    while front < len(body) and isinstance(body[front], keras.layers.TimeDistributed):
        front += 1  # the leading TimeDistributed layers are the per-frame model
    in_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    if len(in_shape) < 2:
        _fail(f"a feature stage needs clips (T, ...) as input, the model takes {in_shape}")
    frames = in_shape[0]
    inp = keras.Input(in_shape[1:], name="frame")
    out = inp
    for wrapper in body[:front]:
        out = wrapper.layer(out)
    if len(out.shape) != 2:
        _fail(f"the per-frame model must give one feature vector, gives {tuple(out.shape[1:])}")
    width = int(out.shape[-1])

    def temporal_model(batch: int | None) -> Any:
        t_in = keras.Input((frames, width), batch_size=batch, name="features")
        x = t_in
        for layer in body[front:]:
            x = layer(x)
        return keras.Model(t_in, x, name="temporal")

    return keras.Model(inp, out, name="feature"), temporal_model, frames, body[:front]


def split(job: dict[str, Any]) -> None:
    model = _load(job["model"])
    feature, temporal_model, frames, front = _parts(model)
    in_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    width = int(feature.outputs[0].shape[-1])
    feature.save(job["feature"])
    temporal_model(1).save(job["temporal"])  # a static batch: recurrent layers convert so
    temporal = temporal_model(None)

    def features_of(clips: np.ndarray) -> np.ndarray:
        flat = clips.reshape((-1, *in_shape[1:])).astype(np.float32)
        f = feature.predict(flat, batch_size=256, verbose=0)
        return np.asarray(f, np.float32).reshape(len(clips), frames, width)

    calib, evalx = np.load(job["calib"]), np.load(job["eval"])
    for name, arr in (("calibration", calib), ("evaluation", evalx)):
        if tuple(arr.shape[1:]) != in_shape:
            _fail(f"{name} clips of shape {arr.shape[1:]} do not fit model input {in_shape}")
    fc, fe = features_of(calib), features_of(evalx)
    probs = np.asarray(temporal.predict(fe, batch_size=64, verbose=0), np.float32)
    np.save(job["calib_features"], fc)
    np.save(job["eval_features"], fe)
    np.save(job["float_out"], probs)
    # the split is exact: the whole model on a few clips gives the same outputs
    k = min(8, len(evalx))
    whole = np.concatenate(
        [np.asarray(model(evalx[i : i + 1].astype(np.float32)), np.float32) for i in range(k)]
    )
    diff = float(np.abs(whole - probs[:k]).max()) if k else 0.0
    if diff > SPLIT_TOLERANCE:
        _fail(f"the split model differs from the whole one by {diff:.2g} (> {SPLIT_TOLERANCE})")
    split_at = ", ".join(w.name for w in front)
    info = {"frames": frames, "features": width, "wrapper": split_at, "max_diff": diff}
    Path(job["info"]).write_text(json.dumps(info))


def main(job_path: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    split(json.loads(Path(job_path).read_text()))


if __name__ == "__main__":
    main(sys.argv[1])
