"""Runs in a child process: Keras model -> LiteRT artifact, plus float predictions.

    python -m converter.child.litert JOB.json

    python -m converter.child.litert variant JOB.json   # one rung of the --budget search

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
from typing import Any, NoReturn

import numpy as np

from converter.calibrate import litert_int8, representative_dataset
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


def _fail(msg: str) -> NoReturn:
    print(msg, file=sys.stderr)
    sys.exit(EXIT_INPUT)


def _log(progress: str | None, **record: Any) -> None:
    if progress:
        with open(progress, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _keras_model(model: Any, s: Strategy, float_probs: np.ndarray, evalx: np.ndarray) -> Any:
    """The model as strategy ``s`` converts it; _Skip when the strategy does not apply."""
    from converter.child.models import SavedModelSource
    from converter.child.rebuild import RebuildError

    if isinstance(model, SavedModelSource):
        if s.rebuild in ("none", "batch1"):
            return model
        raise _Skip("not applicable: a SavedModel is converted as it is")
    try:
        return _rebuild(model, s, float_probs, evalx)
    except RebuildError as exc:
        raise _Skip(f"not applicable: {exc}") from exc


def _rebuild(model: Any, s: Strategy, float_probs: np.ndarray, evalx: np.ndarray) -> Any:
    """A Keras model rebuilt as ``s.rebuild`` says: as it is, batch of one (unrolled), or in
    tf_keras with fused LSTMs (checked against the float predictions)."""
    from converter.child.rebuild import legacy_lstm, recurrent_layers, static_batch

    recurrent = recurrent_layers(model)
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
    _check_reproduces(legacy, float_probs, evalx)
    return legacy


def _check_reproduces(legacy: Any, float_probs: np.ndarray, evalx: np.ndarray) -> None:
    """The tf_keras rebuild predicts what the model does on a few evaluation samples."""
    n = min(8, len(evalx))
    got = np.asarray(legacy.predict(evalx[:n], batch_size=1, verbose=0))
    got = got[0] if got.ndim == float_probs.ndim + 1 else got
    err = float(np.abs(got - float_probs[:n]).max())
    if err > 1e-3:
        raise RuntimeError(
            f"the tf_keras rebuild does not reproduce the model (max |diff| {err:.3g})"
        )


def _order_outputs(flat: bytes, names: dict[int, str]) -> bytes:
    """Put a multi-output model's outputs in the Keras order (the signature's output_0,
    output_1, ...; the converter lists them in another order) and name some of them."""
    from tensorflow.lite.tools import flatbuffer_utils

    m = flatbuffer_utils.convert_bytearray_to_object(flat)
    sg = m.subgraphs[0]
    sig = m.signatureDefs[0] if m.signatureDefs else None
    if sig is not None:
        named = {t.name.decode(): t.tensorIndex for t in sig.outputs}
        found = [named.get(f"output_{i}") for i in range(len(named))]
        order = [i for i in found if i is not None]
        if len(order) == len(found) and sorted(order) == sorted(int(i) for i in sg.outputs):
            sg.outputs = np.array(order, dtype=np.int32)
    for i, name in names.items():
        sg.tensors[int(sg.outputs[i])].name = name.encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def _converter(model: Any) -> Any:
    import tensorflow as tf

    if hasattr(model, "tflite_converter"):  # converter.child.models.SavedModelSource
        return model.tflite_converter()
    return tf.lite.TFLiteConverter.from_keras_model(model)


def _convert(model: Any, s: Strategy, calib: np.ndarray) -> bytes:
    return bytes(litert_int8(_converter(model), calib, s.ops, s.int8_io).convert())


def _verify(
    path: Path, x: np.ndarray, float_probs: np.ndarray, task: str = "classification"
) -> tuple[float, list[str]]:
    """Agreement of the artifact with float, run by the agent's own LiteRT backend."""
    from converter.scoring import agreement, run_artifact
    from edge_agent.backends import open_backend

    got, _ = run_artifact(path, "litert", None, x)  # x: model inputs already
    agree = agreement(float_probs[: len(x)].reshape(len(x), -1), got, task)
    backend = open_backend("litert", path)
    try:
        # the LiteRT backend's interpreter: not part of the Backend protocol
        interp = backend._interp  # type: ignore[attr-defined]
        ops = sorted({o["op_name"] for o in interp._get_ops_details()})
    except Exception:  # an interpreter without the (private) op listing
        ops = []
    return agree, [o for o in ops if o != "DELEGATE"]


def _load(job: dict[str, Any]) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    """The model (with its CAM output if asked), calibration and evaluation samples shaped
    for it, float predictions on the evaluation samples, and the names of extra outputs."""
    from converter.child.models import load_model

    fmt = job.get("format", "keras")
    try:
        model = load_model(job["model"], fmt)
    except Exception as exc:
        what = "Keras" if fmt in ("keras", "h5") else fmt
        _fail(f"cannot load {what} model {Path(job['model']).name}: {type(exc).__name__}: {exc}")
    cam_names: dict[int, str] = {}
    if job.get("cam") is not None:
        model = _with_cam(model, fmt, job)
        cam_names = {1: "cam"}
    in_shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    calib, evalx = np.load(job["calib"]), np.load(job["eval"])
    _check_fits(calib, in_shape, "calibration samples")
    _check_fits(evalx, in_shape, "evaluation samples")
    calib, evalx = _as_input(calib, in_shape), _as_input(evalx, in_shape)
    _check_labels(job, int(model.outputs[0].shape[-1]))
    probs = _float_probs(model, evalx, Path(job["float_out"]))
    stream = job.get("stream")  # windows cut from a recorded stream: float scores for events
    if stream and not Path(stream["out"]).exists():
        xs = np.load(stream["x"])
        _check_fits(xs, in_shape, "stream windows")
        out = model.predict(_as_input(xs, in_shape), batch_size=64, verbose=0)
        np.save(stream["out"], _first_output(out))
    return model, calib, evalx, probs, cam_names


def _with_cam(model: Any, fmt: str, job: dict[str, Any]) -> Any:
    """The model with its class activation map as a second output; the CAM model and where
    the map comes from saved where the job asks."""
    from converter.child.rebuild import RebuildError, cam_model

    if fmt == "savedmodel":
        _fail("--cam needs a Keras model (.keras or .h5), not a SavedModel")
    try:
        model, head = cam_model(model, job["cam"].get("layer"))
    except RebuildError as exc:
        _fail(str(exc))
    if job.get("cam_model_out") and not Path(job["cam_model_out"]).exists():
        model.save(job["cam_model_out"])
    info = {"layer": head.layer, "size": list(head.size)}
    if job.get("cam_info_out"):
        Path(job["cam_info_out"]).write_text(json.dumps(info))
    return model


def _check_fits(arr: np.ndarray, in_shape: tuple[int, ...], what: str) -> None:
    """Each sample holds as many values as the model input."""
    if int(np.prod(arr.shape[1:])) != int(np.prod(in_shape)):
        _fail(f"{what} of shape {arr.shape[1:]} do not fit model input {in_shape}")


def _as_input(arr: np.ndarray, in_shape: tuple[int, ...]) -> np.ndarray:
    return arr.reshape((-1, *in_shape)).astype(np.float32)


def _check_labels(job: dict[str, Any], n_out: int) -> None:
    """A classifier has one output per label (or one sigmoid for two labels)."""
    if (
        job.get("task", "classification") == "classification"
        and job.get("n_labels")
        and job["n_labels"] != n_out
        and not (n_out == 1 and job["n_labels"] == 2)
    ):
        _fail(f"model has {n_out} outputs but {job['n_labels']} labels were given")


def _float_probs(model: Any, evalx: np.ndarray, float_out: Path) -> np.ndarray:
    """The float model's first output on the evaluation samples, saved to ``float_out``."""
    if float_out.exists():  # a child before this one (that crashed) already computed them
        return np.load(float_out)
    probs = _first_output(model.predict(evalx, batch_size=64, verbose=0))
    np.save(float_out, probs)
    return probs


def _first_output(out: Any) -> np.ndarray:
    """A model's first output as float32, from ``predict`` of one or several outputs."""
    return np.asarray(out[0] if isinstance(out, list | tuple) else out, dtype=np.float32)


def _extras(model: Any, cam_names: dict[int, str], extras: dict[str, str]) -> None:
    """Float LiteRT artifacts of the model as it is (fp32; fp16 weights), for the parent to
    evaluate and ship beside the winner (converter.budget.float_extras); a failure leaves the
    file absent."""
    import tensorflow as tf

    for precision, path in extras.items():
        try:
            converter = _converter(model)
            if precision == "fp16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            flat = bytes(converter.convert())
            if len(model.outputs) > 1:
                flat = _order_outputs(flat, cam_names)
            Path(path).write_bytes(flat)
        except Exception as exc:  # recorded by the parent as a missing artifact
            print(f"{precision}: {first_error_line(str(exc))}", file=sys.stderr)


def main(job_path: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    job = json.loads(Path(job_path).read_text())
    model, calib, evalx, probs, cam_names = _load(job)
    task = job.get("task", "classification")
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
            agree, ops = _verify(out_path, gate, probs, task)
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
            _log(
                progress,
                strategy=key,
                event="failed",
                reason=reason,
                seconds=round(time.monotonic() - t0, 1),
            )
            if not progress:
                _fail(f"TFLite converter refused the model: {reason}")
            continue
        _log(
            progress,
            strategy=key,
            event="won",
            bytes=len(flat),
            agreement=agree,
            ops=ops,
            seconds=round(time.monotonic() - t0, 1),
        )
        if job.get("extras"):
            _extras(model, cam_names, job["extras"])
        return
    sys.exit(EXIT_NONE_WORKED)


def _per_layer(model: Any, calib: np.ndarray) -> list[dict[str, Any]]:
    """Per-layer quantization error of full int8, from LiteRT's QuantizationDebugger: each
    quantized op's output against the float op's on the calibration samples, as SNR in dB."""
    import csv
    import io

    def snr_db(f: Any, q: Any, scale: float, zero_point: int) -> float:
        f = np.asarray(f, np.float64)
        err = f - (np.asarray(q, np.float64) - zero_point) * scale
        return float(10 * np.log10(max((f**2).mean(), 1e-30) / max((err**2).mean(), 1e-30)))

    debugger = _debugger(model, calib, [], {"snr_db": snr_db})
    debugger.run()
    buf = io.StringIO()
    debugger.layer_statistics_dump(buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    return [
        {
            "layer": r["tensor_name"],
            "op": r["op_name"],
            "snr_db": round(float(r["snr_db"]), 2),
            "kept_float": False,
        }
        for r in rows
    ]


def _debugger(model: Any, calib: np.ndarray, denylist: list[str], metrics: dict[str, Any]) -> Any:
    import tensorflow as tf

    sample = calib[: min(len(calib), 64)]
    converter = litert_int8(_converter(model), calib, "default")
    options = tf.lite.experimental.QuantizationDebugOptions(
        layer_direct_compare_metrics=metrics or None, denylisted_nodes=denylist or None
    )
    return tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative_dataset(sample), debug_options=options
    )


def variant(job_path: str) -> None:
    """One rung of the --budget search (converter.budget): ``float-head`` (full int8 but the
    final softmax/sigmoid kept float), ``mixed`` (also the layers with the most quantization
    error kept float), ``int16x8``, ``fp16`` or ``fp32``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    job = json.loads(Path(job_path).read_text())
    model, calib, _, _, cam_names = _load(job)
    kind = job["variant"]
    try:
        if kind in ("mixed", "float-head"):
            flat = _partly_float(model, calib, kind, Path(job["layers_out"]))
        else:
            flat = _uniform(model, calib, kind)
    except Exception as exc:
        _fail(f"{kind}: {first_error_line(str(exc) or type(exc).__name__)}")
    if len(model.outputs) > 1:
        flat = _order_outputs(flat, cam_names)
    Path(job["out"]).write_bytes(flat)


def _partly_float(model: Any, calib: np.ndarray, kind: str, layers_out: Path) -> bytes:
    """Full int8 with some layers kept float (``mixed``, ``float-head``); every layer's
    quantization error, and which were kept float and why, written to ``layers_out``."""
    layers = _per_layer(model, calib)
    worst = []
    if kind == "mixed":
        worst = sorted(layers, key=lambda r: r["snr_db"])[: max(1, len(layers) // 5)]
    for r in worst:
        r["kept_float"], r["why"] = True, "among the worst fifth by SNR"
    head = bool(layers) and layers[-1]["op"] in ("SOFTMAX", "LOGISTIC")
    if kind == "float-head" and not head:
        last = layers[-1]["op"] if layers else "nothing"
        _fail(f"float-head: the model ends in {last}, not a softmax or sigmoid")
    if head and layers[-1] not in worst:
        # 256 int8 levels of probability turn close scores into ties (AUC, thresholds)
        worst.append(layers[-1])
        layers[-1]["kept_float"], layers[-1]["why"] = True, "the final activation"
    layers_out.write_text(json.dumps(layers))
    debugger = _debugger(model, calib, [r["layer"] for r in worst], {})
    return bytes(debugger.get_nondebug_quantized_model())


def _uniform(model: Any, calib: np.ndarray, kind: str) -> bytes:
    """The whole model at one precision: ``int16x8``, ``fp16`` or ``fp32``."""
    import tensorflow as tf

    converter = _converter(model)
    if kind == "int16x8":
        litert_int8(converter, calib, "int16x8")
    elif kind == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif kind != "fp32":
        _fail(f"unknown variant '{kind}'")
    return bytes(converter.convert())


if __name__ == "__main__":
    if sys.argv[1] == "variant":
        variant(sys.argv[2])
    else:
        main(sys.argv[1])
