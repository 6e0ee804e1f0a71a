"""Trained model + calibration and evaluation data -> a verified bundle.

Sources (converter.inputs): Keras ``.keras``, legacy ``.h5``, a SavedModel directory — LiteRT
(full int8 by the first conversion strategy that works, converter.strategies; with --budget
the cheapest artifact that meets it, converter.budget) plus ONNX fp32 and QDQ int8 for ONNX
Runtime / TensorRT (converter.onnx) — or an ONNX model (ONNX fp32 and int8 only).
A ready .tflite (or an .onnx with ``onnx_input="wrap"``) is wrapped instead (converter.wrap).
Tasks: classification, segmentation (masks as targets), image_to_image (images as targets).

TensorFlow runs only in child processes (converter.child.litert, converter.child.onnx); this
process prepares the data with the agent's own preprocessing, evaluates every artifact with
the agent's own runtime, and writes the bundle into a temporary directory that is renamed
into place only when complete.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from converter import budget as B
from converter import progress
from converter.bundle_writer import Built, finish, staging
from converter.calibrate import calibration_warnings, too_few
from converter.chain import convert_chain
from converter.data import Data, class_outputs, load_data, prepare
from converter.errors import ConversionError
from converter.inputs import source_format
from converter.litert import build_litert
from converter.messages import collapse
from converter.onnx import OnnxOutcome, onnx_artifacts, onnx_source_artifacts
from converter.request import ConvertRequest
from converter.runner import run_child
from converter.scoring import Scored, run_artifact, stream_outputs
from converter.stream_eval import score_streams
from converter.wrap import wrap
from edge_agent.bundle import (
    Bundle,
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
    if req.feature_stage:
        return convert_chain(req, fmt, convert)
    wrap_it = fmt == "tflite" or (fmt == "onnx" and req.onnx_input == "wrap")
    if wrap_it and req.task != "classification":
        raise ConversionError(
            "a wrapped model is evaluated as a classifier; use --onnx-input "
            "quantize for an ONNX segmentation or image model"
        )
    data = load_data(req, fmt)
    if wrap_it:
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
            # an ONNX source: its fp32 artifact is the float model
            built.float_streams = float_streams or built.scored["onnx-fp32"].streams
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

    def score_float() -> tuple[np.ndarray, dict[str, Any]]:
        float_outs = np.load(work / "float.npy")
        float_m = data.metrics(float_outs)
        if data.streams:
            float_m.update(data.event_metrics(_split_streams(data, work), req.event_tolerance_s))
        return float_outs, float_m

    lit = build_litert(
        req, job, data.layout, stage, work, lambda p: _score(p, "litert", req, data), score_float
    )
    artifacts, runs, report, cam = lit.artifacts, lit.runs, lit.report, lit.cam
    strategy = lit.strategy
    onnx = OnnxOutcome()
    if req.onnx:
        source = work / "model_cam.keras" if req.cam else req.model
        onnx = onnx_artifacts(
            source,
            work / "calib.npy",
            stage,
            work,
            req.profile,
            artifacts[0].inputs[0].layout,
            run_child,
            source_format="keras" if req.cam else fmt,
        )
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
    return Built(
        [*artifacts, *onnx.artifacts],
        runs,
        lit.float_outs,
        lit.float_metrics,
        strategy,
        cam,
        report,
    )


def _from_onnx(
    req: ConvertRequest, data: Data, stage: Path, work: Path, warnings: list[str]
) -> Built:
    """An ONNX model: itself as ONNX fp32 and its QDQ int8; no LiteRT (needs onnx2tf)."""
    onnx = onnx_source_artifacts(
        req.model, work / "calib.npy", stage, work, req.profile, run_child, data.layout
    )
    warnings += onnx.warnings
    warnings.append(
        "no LiteRT artifact: converting ONNX to LiteRT needs onnx2tf, whose "
        "releases pin TensorFlow 2.19 and numpy 1.26 (this converter runs TensorFlow "
        "2.21 on numpy 2); convert the Keras/SavedModel source for LiteRT"
    )
    runs = {
        f"onnx-{a.precision}": _score(stage / a.file, "onnx", req, data) for a in onnx.artifacts
    }
    ref = runs["onnx-fp32"]
    artifacts = list(onnx.artifacts)
    report: dict[str, Any] = {"onnx": onnx.info}
    if req.budget and "onnx-int8" in runs:
        missed = B.misses(req.budget, ref.metrics, runs["onnx-int8"].metrics)
        attempts = [
            {
                "rung": "int8",
                "precision": "int8",
                "met": not missed,
                "reason": "; ".join(missed) or "meets every budgeted metric",
            },
            {"rung": "fp32", "precision": "fp32", "met": True, "reason": "the source itself"},
        ]
        if missed:
            (stage / "model_int8.onnx").unlink()
            artifacts = [a for a in artifacts if a.precision != "int8"]
            del runs["onnx-int8"]
        report["budget"] = {
            "budget": req.budget,
            "attempts": attempts if missed else attempts[:1],
            "winner": "fp32" if missed else "int8",
            "why": "int8 missed the budget: the fp32 source ships alone"
            if missed
            else "int8 meets the budget",
        }
    strategy = "onnx source fp32" + (
        f"; onnx int8 ({onnx.info['scheme']})" if "onnx-int8" in runs else ""
    )
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
    return score_streams(
        data.streams,
        outputs,
        lambda o: class_outputs(data, o)[0],
        req.events,
        data.labels,
        req.event_tolerance_s,
    )
