"""Runs in a child process: Keras model -> LiteRT artifact, plus float predictions.

    python -m converter.litert_child JOB.json

The job names the conversion strategies to try, in order (converter.strategies). Before each
attempt the child appends a "start" line to the job's progress file, after it the outcome, so a
crash here (the TFLite converter can segfault on recurrent models) kills only this process and
the parent knows which strategy did it. On a problem with the inputs we print one line to
stderr and exit 3; when no strategy worked, exit 4.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from converter.strategies import (
    EXIT_INPUT,
    EXIT_NONE_WORKED,
    MIN_AGREEMENT,
    Strategy,
    first_error_line,
    strategy,
)

GATE_SAMPLES = 256  # evaluation samples the agreement gate runs through the artifact


class _Skip(Exception):
    """The strategy does not apply to this model."""


def _fail(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(EXIT_INPUT)


def _log(progress: str | None, **record: Any) -> None:
    if progress:
        with open(progress, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _keras_model(model: Any, s: Strategy, float_probs: np.ndarray, evalx: np.ndarray) -> Any:
    from converter.rebuild import RebuildError, legacy_lstm, recurrent_layers, static_batch

    recurrent = recurrent_layers(model)
    try:
        if s.rebuild == "none":
            return model
        if s.rebuild == "batch1":
            return static_batch(model, unroll=False)
        if s.rebuild == "unroll-if-recurrent":
            return static_batch(model, unroll=bool(recurrent))
        if not recurrent:
            raise _Skip("not applicable: the model has no recurrent layers")
        if s.rebuild == "unroll":
            return static_batch(model, unroll=True)
        other = sorted(set(recurrent) - {"LSTM"})
        if other:
            raise _Skip(f"not applicable: {', '.join(other)} has no fused int8 LiteRT op")
        legacy = legacy_lstm(model)
    except RebuildError as exc:
        raise _Skip(f"not applicable: {exc}") from exc
    n = min(8, len(evalx))
    got = np.asarray(legacy.predict(evalx[:n], batch_size=1, verbose=0))
    got = got[0] if got.ndim == float_probs.ndim + 1 else got
    err = float(np.abs(got - float_probs[:n]).max())
    if err > 1e-3:
        raise RuntimeError(
            f"the tf_keras rebuild does not reproduce the model (max |diff| {err:.3g})"
        )
    return legacy


def _order_outputs(flat: bytes, names: dict[int, str]) -> bytes:
    """Put a multi-output model's outputs in the Keras order (the signature's output_0,
    output_1, ...; the converter lists them in another order) and name some of them."""
    from tensorflow.lite.tools import flatbuffer_utils

    m = flatbuffer_utils.convert_bytearray_to_object(flat)
    sg = m.subgraphs[0]
    sig = m.signatureDefs[0] if m.signatureDefs else None
    if sig is not None:
        named = {t.name.decode(): t.tensorIndex for t in sig.outputs}
        order = [named.get(f"output_{i}") for i in range(len(named))]
        if None not in order and sorted(order) == sorted(int(i) for i in sg.outputs):
            sg.outputs = np.array(order, dtype=np.int32)
    for i, name in names.items():
        sg.tensors[int(sg.outputs[i])].name = name.encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def _convert(model: Any, s: Strategy, calib: np.ndarray) -> bytes:
    import tensorflow as tf

    def representative():  # type: ignore[no-untyped-def]
        for i in range(len(calib)):
            yield [calib[i : i + 1]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if s.ops != "dynamic":
        converter.representative_dataset = representative
    if s.ops == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    elif s.ops == "int8+float":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
            tf.lite.OpsSet.TFLITE_BUILTINS,
        ]
    if s.int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    return bytes(converter.convert())


def _verify(path: Path, x: np.ndarray, float_probs: np.ndarray) -> tuple[float, list[str]]:
    """Agreement of the artifact with float, run by the agent's own LiteRT backend."""
    from edge_agent.backends import open_backend
    from edge_agent.preprocess import dequantize, to_input

    backend = open_backend("litert", path)
    spec_in, spec_out = backend.inputs[0], backend.outputs[0]
    got = np.stack(
        [
            dequantize(backend.invoke([to_input(s, spec_in)])[0], spec_out.quantization).reshape(-1)
            for s in x
        ]
    )
    ref = float_probs[: len(x)].reshape(len(x), -1)
    if ref.shape[1] == 1:
        cut = 0.5 if ref.min() >= 0 and ref.max() <= 1 else 0.0
        agree = float(np.mean((got[:, 0] >= cut) == (ref[:, 0] >= cut)))
    else:
        agree = float(np.mean(got.argmax(1) == ref.argmax(1)))
    try:
        ops = sorted({o["op_name"] for o in backend._interp._get_ops_details()})  # type: ignore[attr-defined]
    except Exception:  # an interpreter without the (private) op listing
        ops = []
    return agree, [o for o in ops if o != "DELEGATE"]


def main(job_path: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    job = json.loads(Path(job_path).read_text())
    import keras

    try:
        model = keras.saving.load_model(job["model"], compile=False)
    except Exception as exc:
        _fail(f"cannot load Keras model {Path(job['model']).name}: {type(exc).__name__}: {exc}")
    cam_names: dict[int, str] = {}
    if job.get("cam") is not None:
        from converter.rebuild import RebuildError, cam_model

        try:
            model, head = cam_model(model, job["cam"].get("layer"))
        except RebuildError as exc:
            _fail(str(exc))
        cam_names = {1: "cam"}
        if not Path(job["cam_model_out"]).exists():
            model.save(job["cam_model_out"])
        info = {"layer": head.layer, "size": list(head.size)}
        Path(job["cam_info_out"]).write_text(json.dumps(info))
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

    float_out = Path(job["float_out"])
    if float_out.exists():  # a child before this one (that crashed) already computed them
        probs = np.load(float_out)
    else:
        out = model.predict(evalx, batch_size=64, verbose=0)
        probs = np.asarray(out[0] if isinstance(out, list | tuple) else out, dtype=np.float32)
        np.save(float_out, probs)

    progress = job.get("progress")
    min_agreement = float(job.get("min_agreement", MIN_AGREEMENT))
    gate = evalx[:GATE_SAMPLES]
    out_path = Path(job["tflite_out"])
    for key in job.get("strategies", ["full-int8"]):
        s = strategy(key)
        _log(progress, strategy=key, event="start")
        t0 = time.monotonic()
        try:
            flat = _convert(_keras_model(model, s, probs, evalx), s, calib)
            if len(model.outputs) > 1:
                flat = _order_outputs(flat, cam_names)
            out_path.write_bytes(flat)
            agree, ops = _verify(out_path, gate, probs)
            if agree < min_agreement:
                raise RuntimeError(
                    f"the artifact agrees with float on only {agree:.1%} of {len(gate)} "
                    f"evaluation samples (< {min_agreement:.0%})"
                )
        except _Skip as exc:
            out_path.unlink(missing_ok=True)
            _log(progress, strategy=key, event="skipped", reason=str(exc))
            continue
        except Exception as exc:
            out_path.unlink(missing_ok=True)
            reason = first_error_line(str(exc) or type(exc).__name__)
            _log(progress, strategy=key, event="failed", reason=reason,
                 seconds=round(time.monotonic() - t0, 1))  # fmt: skip
            if not progress:
                _fail(f"TFLite converter refused the model: {reason}")
            continue
        _log(progress, strategy=key, event="won", bytes=len(flat), agreement=agree, ops=ops,
             seconds=round(time.monotonic() - t0, 1))  # fmt: skip
        return
    sys.exit(EXIT_NONE_WORKED)


if __name__ == "__main__":
    main(sys.argv[1])
