"""Trained model + calibration and evaluation data -> a verified bundle.

Sources (converter.inputs): Keras ``.keras``, legacy ``.h5``, a SavedModel directory — LiteRT
(full int8 by the first conversion strategy that works, converter.strategies; with --budget
the cheapest artifact that meets it, converter.budget) plus ONNX fp32 and QDQ int8 for ONNX
Runtime / TensorRT (converter.onnx_artifacts) — or an ONNX model (ONNX fp32 and int8 only).
A ready .tflite (or an .onnx with ``onnx_input="wrap"``) is wrapped instead (converter.wrap).
Tasks: classification, segmentation (masks as targets), image_to_image (images as targets).

TensorFlow runs only in child processes (converter.litert_child, converter.onnx_child); this
process prepares the data with the agent's own preprocessing, evaluates every artifact with
the agent's own runtime, and writes the bundle into a temporary directory that is renamed
into place only when complete.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from converter import budget as B
from converter import progress
from converter.bundle_writer import Built, finish, staging
from converter.calibrate import calibration_warnings, too_few
from converter.data import Data, class_outputs, load_data, prepare
from converter.errors import ConversionError
from converter.inputs import source_format
from converter.layout import RANK_LAYOUTS
from converter.messages import collapse
from converter.onnx_artifacts import OnnxOutcome, onnx_artifacts, onnx_source_artifacts
from converter.request import ConvertRequest
from converter.runner import CHILD_TIMEOUT_S, run_child
from converter.scoring import Scored, run_artifact, stream_outputs
from converter.strategies import convert_litert
from converter.stream_eval import score_streams
from edge_agent.backends import open_backend
from edge_agent.bundle import (
    Artifact,
    Bundle,
    CamSpec,
)
from edge_agent.keys import load_signer_key

__all__ = ["convert"]

log = logging.getLogger("medge.convert")

WRAPPED = (".tflite", ".onnx")  # ready artifacts: wrapped as they are (converter.wrap)


def _validate(req: ConvertRequest) -> str:
    """What the request's own validation cannot see, before any long work: the model's
    format, the signing key, the output directory. Return the model's source format."""
    fmt = source_format(req.model)
    wrapped = fmt == "tflite" or (fmt == "onnx" and req.onnx_input == "wrap")
    if req.cam and not wrapped and (req.task != "classification" or fmt not in ("keras", "h5")):
        raise ConversionError("--cam needs a Keras (.keras/.h5) classification model")
    if req.sign_key is not None:
        load_signer_key(req.sign_key)  # fail before the long work, not after
    if req.out.exists() and any(req.out.iterdir()) and not req.force:
        raise ConversionError(f"{req.out} exists and is not empty (use --force to replace it)")
    return fmt


def convert(req: ConvertRequest) -> Bundle:
    """Convert, evaluate and write one bundle; return it, loaded and verified."""
    fmt = _validate(req)
    wrap_it = fmt == "tflite" or (fmt == "onnx" and req.onnx_input == "wrap")
    if wrap_it and req.task != "classification":
        raise ConversionError("a wrapped model is evaluated as a classifier; use --onnx-input "
                              "quantize for an ONNX segmentation or image model")  # fmt: skip
    data = load_data(req, fmt)
    if wrap_it:
        from converter.wrap import wrap

        return wrap(req, data.xc, data.xe, data.y, data.labels, data.streams, data.layout)
    warnings = too_few(len(data.xc))
    with (
        staging(req.out) as stage,
        tempfile.TemporaryDirectory(prefix="medge-convert-", ignore_cleanup_errors=True) as tmp,
    ):
        work = Path(tmp)
        np.save(work / "calib.npy", prepare(data.xc, req.preprocess, data.layout))
        np.save(work / "eval.npy", prepare(data.xe, req.preprocess, data.layout))
        if data.streams:
            windows = np.concatenate([s.x for s in data.streams])
            np.save(work / "stream.npy", prepare(windows, req.preprocess))
        t0 = time.monotonic()
        if fmt == "onnx":
            built = _from_onnx(req, data, stage, work, warnings)
        else:
            built = _from_tf(req, fmt, data, stage, work, warnings)
        built.report["convert_seconds"] = round(time.monotonic() - t0, 1)
        if data.streams:
            float_streams = _split_streams(data, work) if fmt != "onnx" else None
            built.report["events"] = _event_section(req, data, built, float_streams)
        for w in calibration_warnings(req.model, data, work):
            if w not in warnings:
                warnings.append(w)
        return finish(req, fmt, data, stage, built, collapse(warnings))


def _score(path: Path, runtime: str, req: ConvertRequest, data: Data) -> Scored:
    with progress.step(f"evaluating {path.name} ({runtime}, {len(data.xe)} samples)"):
        outs, lat = run_artifact(path, runtime, req.preprocess, data.xe, data.layout)
    scored = Scored(data.metrics(outs), outs, lat)
    if data.streams:  # events too: the budget may name them
        windows = [s.x for s in data.streams]
        scored.streams = stream_outputs(path, runtime, req.preprocess, windows)
        scored.metrics.update(data.event_metrics(scored.streams, req.event_tolerance_s))
    return scored


def _litert_artifact(stage: Path, file: str, precision: str, layout: str | None) -> Artifact:
    backend = open_backend("litert", stage / file)
    layout = layout or RANK_LAYOUTS.get(len(backend.inputs[0].shape))
    return Artifact(
        file=file,
        runtime="litert",
        precision=precision,  # type: ignore[arg-type]
        inputs=[t.model_copy(update={"layout": layout}) for t in backend.inputs],
        outputs=backend.outputs,
    )


def _from_tf(
    req: ConvertRequest, fmt: str, data: Data, stage: Path, work: Path, warnings: list[str]
) -> Built:
    """Keras, h5 or SavedModel: LiteRT (strategies, then the budget search) and ONNX."""
    job = {
        "model": str(req.model),
        "format": fmt,
        "task": data.task,
        "calib": str(work / "calib.npy"),
        "eval": str(work / "eval.npy"),
        "float_out": str(work / "float.npy"),
        "n_labels": len(data.labels) if data.task == "classification" else 0,
        "cam": {"layer": req.cam_layer} if req.cam else None,
        "cam_model_out": str(work / "model_cam.keras"),
        "cam_info_out": str(work / "cam.json"),
    }
    if data.streams:  # float scores of the stream windows, from the same child
        job["stream"] = {"x": str(work / "stream.npy"), "out": str(work / "stream_float.npy")}
    keys = req.strategy_keys
    with progress.step(f"LiteRT conversion (strategies: {', '.join(keys)})"):
        litert = convert_litert(
            {
                **job,
                "tflite_out": str(work / "model.tflite"),
                "min_agreement": req.min_agreement,
                "extras": {p: str(work / f"extra-{p}.tflite") for p in ("fp16", "fp32")}
                if req.float_artifacts != "none" else {},
            },
            work,
            keys,
            CHILD_TIMEOUT_S,
        )
    float_outs = np.load(work / "float.npy")
    float_m = data.metrics(float_outs)
    if data.streams:
        float_m.update(data.event_metrics(_split_streams(data, work), req.event_tolerance_s))

    def evaluate(p: Path) -> Scored:
        return _score(p, "litert", req, data)

    precision, path = litert.winner.precision, work / "model.tflite"
    scored = evaluate(path)
    report: dict[str, Any] = {"litert": litert.as_report()}
    if req.budget:

        def make(rung: B.Rung) -> tuple[Path, list[dict[str, Any]]]:
            ready = work / f"extra-{rung.key}.tflite"  # fp16/fp32: made with the int8 one
            if ready.exists():
                return ready, []
            out, layers = work / f"rung-{rung.key}.tflite", work / "layers.json"
            run_child({**job, "variant": rung.key, "out": str(out), "layers_out": str(layers)},
                      work, "converter.litert_child", f"LiteRT {rung.key} conversion",
                      ["variant"])  # fmt: skip
            per_layer = rung.key in ("mixed", "float-head")
            return out, json.loads(layers.read_text()) if per_layer else []

        outcome = B.search(req.budget, float_m, (precision, path, scored), make, evaluate,
                           B.rungs(req.fallback))  # fmt: skip
        precision, path, scored = outcome.precision, outcome.path, outcome.scored
        report["budget"] = B.describe(outcome, req.budget)
        if outcome.per_layer:
            report["per_layer_error"] = outcome.per_layer
    file = f"model_{precision}.tflite"
    shutil.copyfile(path, stage / file)
    artifacts = [_litert_artifact(stage, file, precision, data.layout)]
    runs = {f"litert-{precision}": scored}
    extras, decisions = B.float_extras(precision, scored, work, evaluate, req.float_artifacts)
    report["float_artifacts"] = decisions
    for extra, extra_scored in extras:
        shutil.copyfile(work / f"extra-{extra}.tflite", stage / f"model_{extra}.tflite")
        artifacts.append(_litert_artifact(stage, f"model_{extra}.tflite", extra, data.layout))
        runs[f"litert-{extra}"] = extra_scored
    cam = None
    if req.cam:
        info = json.loads((work / "cam.json").read_text())
        cam = CamSpec(output=1, layer=info["layer"], upsample_to=info["size"])
    strategy = f"litert {litert.winner.key}"
    if report.get("budget", {}).get("winner", "int8") != "int8":
        strategy += f" -> budget {report['budget']['winner']}"
    onnx = OnnxOutcome()
    if req.onnx:
        source = work / "model_cam.keras" if req.cam else req.model
        onnx = onnx_artifacts(source, work / "calib.npy", stage, work, req.profile,
                              artifacts[0].inputs[0].layout, run_child,
                              source_format="keras" if req.cam else fmt)  # fmt: skip
    warnings += onnx.warnings
    if cam is not None and any(len(a.outputs) <= cam.output for a in onnx.artifacts):
        warnings.append("ONNX artifacts skipped: their export lost the cam output")
        for a in onnx.artifacts:
            (stage / a.file).unlink(missing_ok=True)
        onnx.artifacts = []
    for a in onnx.artifacts:
        runs[f"onnx-{a.precision}"] = _score(stage / a.file, "onnx", req, data)
    if onnx.artifacts:
        strategy += f"; onnx fp32 ({onnx.info['route']}, opset {onnx.info['opset']})"
    if "scheme" in onnx.info:
        strategy += f"; onnx int8 ({onnx.info['scheme']})"
    report["onnx"] = onnx.info
    return Built([*artifacts, *onnx.artifacts], runs, float_outs, float_m, strategy, cam, report)


def _from_onnx(
    req: ConvertRequest, data: Data, stage: Path, work: Path, warnings: list[str]
) -> Built:
    """An ONNX model: itself as ONNX fp32 and its QDQ int8; no LiteRT (needs onnx2tf)."""
    onnx = onnx_source_artifacts(req.model, work / "calib.npy", stage, work, req.profile,
                                 run_child, data.layout)  # fmt: skip
    warnings += onnx.warnings
    warnings.append("no LiteRT artifact: converting ONNX to LiteRT needs onnx2tf, whose "
                    "releases pin TensorFlow 2.19 and numpy 1.26 (this converter runs TensorFlow "
                    "2.21 on numpy 2); convert the Keras/SavedModel source for LiteRT")  # fmt: skip
    runs = {f"onnx-{a.precision}": _score(stage / a.file, "onnx", req, data)
            for a in onnx.artifacts}  # fmt: skip
    ref = runs["onnx-fp32"]
    artifacts = list(onnx.artifacts)
    report: dict[str, Any] = {"onnx": onnx.info}
    if req.budget and "onnx-int8" in runs:
        missed = B.misses(req.budget, ref.metrics, runs["onnx-int8"].metrics)
        attempts = [
            {"rung": "int8", "precision": "int8", "met": not missed,
             "reason": "; ".join(missed) or "meets every budgeted metric"},
            {"rung": "fp32", "precision": "fp32", "met": True, "reason": "the source itself"},
        ]  # fmt: skip
        if missed:
            (stage / "model_int8.onnx").unlink()
            artifacts = [a for a in artifacts if a.precision != "int8"]
            del runs["onnx-int8"]
        report["budget"] = {
            "budget": req.budget,
            "attempts": attempts if missed else attempts[:1],
            "winner": "fp32" if missed else "int8",
            "why": "int8 missed the budget: the fp32 source ships alone"
            if missed else "int8 meets the budget",
        }  # fmt: skip
    strategy = "onnx source fp32" + (f"; onnx int8 ({onnx.info['scheme']})" if "onnx-int8" in runs
                                     else "")  # fmt: skip
    return Built(artifacts, runs, ref.outputs, ref.metrics, strategy, None, report)


def _split_streams(data: Data, work: Path) -> list[np.ndarray]:
    """The float model's outputs for the stream windows (one array for every recording, in
    order, from the conversion child), split back per recording."""
    bounds = np.cumsum([len(s.x) for s in data.streams])[:-1]
    return np.split(np.load(work / "stream_float.npy"), bounds)


def _event_section(
    req: ConvertRequest, data: Data, built: Built, float_streams: list[np.ndarray] | None
) -> dict[str, Any]:
    """Event detection over the recordings by the float model and every artifact shipped (each
    scored when it was evaluated)."""
    outputs: dict[str, list[np.ndarray]] = {}
    for variant, scored in built.scored.items():
        assert scored.streams is not None  # _score runs the recordings when there are any
        outputs[variant] = scored.streams
    # an ONNX source: its fp32 artifact is the float model
    outputs = {"float": float_streams or outputs["onnx-fp32"], **outputs}
    return score_streams(data.streams, outputs, lambda o: class_outputs(data, o)[0], req.events,
                         data.labels, req.event_tolerance_s)  # fmt: skip


