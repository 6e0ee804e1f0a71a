"""A clip model converted as a chain: a per-frame feature model, then a temporal model over the
window of feature vectors (``--feature-stage``; docs/bundle.md, "feature stage").

A Keras model whose first layer is a TimeDistributed wrapper (a CNN per frame) followed by one
chain of layers (an LSTM/GRU and its head) is split in a child process
(converter.child.split, which checks that the two parts give the whole model's outputs). Each
part is then converted by :func:`converter.convert.convert` as any model is:

1. the feature model as a regression of its own float features (the report's ``feature_stage``
   section: how far the int8 features are from float);
2. the temporal model as the classifier, calibrated on the features the *int8* feature model
   gives on the calibration clips (what it will see on the device) and evaluated on float
   features (its own loss alone).

The bundle ships both in pairs of one precision (int8 + int8, fp32 + fp32), and the pairs are
scored end to end on the evaluation clips by the agent's own chain (edge_agent.chain, with its
per-frame cache), against the whole float model: those are the report's numbers and the
budget's. An int8 pair that misses the budget is not shipped. No ONNX artifacts are made for a
chained bundle (the report says so).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ed25519

from converter import budget as B
from converter.bundle_writer import Built, finish, staging
from converter.calibrate import too_few
from converter.data import Data, load_data, prepare
from converter.errors import ConversionError
from converter.messages import collapse
from converter.request import ConvertRequest
from converter.runner import run_child
from converter.scoring import Scored
from edge_agent.backends import open_backend
from edge_agent.bundle import Artifact, Bundle, FeatureStage
from edge_agent.chain import FeatureStage as FeatureRunner
from edge_agent.errors import BundleError
from edge_agent.keys import write_private_pem
from edge_agent.preprocess import dequantize, to_input

__all__ = ["convert_chain"]

log = logging.getLogger("medge.convert")

PAIRS = ("int8", "fp32")  # precisions shipped as feature + temporal pairs, in this order
EVAL_FRAMES = 512  # feature report: at most this many evaluation frames


def convert_chain(
    req: ConvertRequest, fmt: str, convert: Callable[[ConvertRequest], Bundle]
) -> Bundle:
    """Split, convert both parts (each by ``convert``, as any model is), score the pairs end
    to end and write one chained bundle."""
    if fmt != "keras":
        raise ConversionError("--feature-stage needs a Keras (.keras) model")
    if req.task != "classification" or req.streams or req.cam:
        raise ConversionError("--feature-stage: a classifier of clips, without --stream or --cam")
    if req.window is None:
        raise ConversionError("--feature-stage needs --window (frames per clip)")
    data = load_data(req, fmt)
    warnings = too_few(len(data.xc))
    with (
        staging(req.out) as stage,
        tempfile.TemporaryDirectory(prefix="medge-chain-", ignore_cleanup_errors=True) as tmp,
    ):
        work = Path(tmp)
        t0 = time.monotonic()
        info = _split(req, data, work)
        key = _throwaway_key(work)  # the parts are working files: signed only to be loaded
        feature = convert(_feature_request(req, data, work, key))
        calib_features = _features(feature, data.xc)
        temporal = convert(_temporal_request(req, data, work, key, calib_features))
        built = _assemble(req, data, work, stage, feature, temporal, info)
        built.report["convert_seconds"] = round(time.monotonic() - t0, 1)
        return finish(req, fmt, data, stage, built, collapse(warnings))


def _split(req: ConvertRequest, data: Data, work: Path) -> dict[str, Any]:
    import json

    np.save(work / "calib.npy", prepare(data.xc, req.preprocess))
    np.save(work / "eval.npy", prepare(data.xe, req.preprocess))
    job = {
        "model": str(req.model),
        "calib": str(work / "calib.npy"),
        "eval": str(work / "eval.npy"),
        "feature": str(work / "feature.keras"),
        "temporal": str(work / "temporal.keras"),
        "calib_features": str(work / "calib_features.npy"),
        "eval_features": str(work / "eval_features.npy"),
        "float_out": str(work / "float.npy"),
        "info": str(work / "split.json"),
    }
    run_child(job, work, "converter.child.split", "splitting the model at its per-frame layer")
    info: dict[str, Any] = json.loads((work / "split.json").read_text())
    if req.window is not None and info["frames"] != req.window.length:
        raise ConversionError(
            f"the model takes clips of {info['frames']} frames but --window says "
            f"{req.window.length}"
        )
    return info


def _throwaway_key(work: Path) -> Path:
    path = work / "parts.key"
    write_private_pem(path, ed25519.Ed25519PrivateKey.generate())
    return path


def _frames(clips: np.ndarray) -> np.ndarray:
    return clips.reshape((-1, *clips.shape[2:]))


def _feature_request(req: ConvertRequest, data: Data, work: Path, key: Path) -> ConvertRequest:
    """The feature model as a regression of its float features, on frames."""
    fc = np.load(work / "calib_features.npy")
    fe = np.load(work / "eval_features.npy")
    xe, ye = _frames(data.xe), fe.reshape(-1, fe.shape[-1])
    pick = np.linspace(0, len(xe) - 1, min(EVAL_FRAMES, len(xe))).astype(int)
    np.savez(
        work / "feature.npz",
        calib_images=_frames(data.xc),
        calib_targets=fc.reshape(-1, fc.shape[-1]),
        eval_images=xe[pick],
        eval_targets=ye[pick],
    )
    return _part(
        req, work, key, "feature", preprocess=req.preprocess, task="regression", activation="none"
    )


def _features(bundle: Bundle, clips: np.ndarray) -> np.ndarray:
    """(N, T, F) features of raw clips by the feature bundle's int8 artifact, as the device
    computes them."""
    art = bundle.artifact("litert", "int8")
    runner = FeatureRunner(bundle.path_of(art), art, bundle.manifest.preprocess, clips.shape[1])
    return np.stack([runner.features(runner.prepare(c)) for c in clips]).astype(np.float32)


def _temporal_request(
    req: ConvertRequest, data: Data, work: Path, key: Path, calib_features: np.ndarray
) -> ConvertRequest:
    """The temporal model: calibrated on int8 features, evaluated on float features."""
    if data.yc is None:
        raise ConversionError("--feature-stage needs labelled calibration clips")
    np.savez(
        work / "temporal.npz",
        calib_images=calib_features,
        calib_labels=data.yc,
        eval_images=np.load(work / "eval_features.npy"),
        eval_labels=data.y,
    )
    return _part(
        req,
        work,
        key,
        "temporal",
        labels=data.labels,
        positive_label=req.positive_label,
        threshold=req.threshold,
        activation=req.activation,
        min_agreement=req.min_agreement,
    )


def _part(req: ConvertRequest, work: Path, key: Path, part: str, **fields: Any) -> ConvertRequest:
    """The request that converts one part (``work/<part>.keras`` on ``work/<part>.npz``): LiteRT
    only, int8 with an fp32 beside it, the request's profile and strategies, signed by the
    throwaway key (the part is a working file)."""
    return ConvertRequest(
        model=work / f"{part}.keras",
        calib=work / f"{part}.npz",
        eval=work / f"{part}.npz",
        calib_split="calib",
        eval_split="eval",
        out=work / f"{part}-bundle",
        profile=req.profile,
        name=part,
        onnx=False,
        float_artifacts="fp32",
        strategies=req.strategies,
        sign_key=key,
        **fields,
    )


def _pair(feature: Bundle, temporal: Bundle, precision: str) -> tuple[Artifact, Artifact] | None:
    try:
        return feature.artifact("litert", precision), temporal.artifact("litert", precision)
    except BundleError:  # that precision was not made (a float extra can fail): no pair
        return None


def _score_pair(
    req: ConvertRequest, data: Data, feature: Bundle, temporal: Bundle, pair: tuple
) -> Scored:
    """The pair on every evaluation clip, in order, as the agent runs it (the per-frame cache
    included): outputs, metrics, latency per clip."""
    f_art, t_art = pair
    runner = FeatureRunner(feature.path_of(f_art), f_art, req.preprocess, data.xe.shape[1])
    backend = open_backend("litert", temporal.path_of(t_art), 1)
    spec_in, spec_out = t_art.inputs[0], t_art.outputs[0]
    outs, lat = [], []
    for clip in data.xe:
        t = time.perf_counter()
        x = to_input(runner.features(runner.prepare(clip)), spec_in)
        raw = backend.invoke([x])[0]
        outs.append(dequantize(raw, spec_out.quantization).reshape(spec_out.shape[1:]))
        lat.append(time.perf_counter() - t)
    outputs = np.stack(outs)
    return Scored(data.metrics(outputs), outputs, lat)


def _assemble(
    req: ConvertRequest,
    data: Data,
    work: Path,
    stage: Path,
    feature: Bundle,
    temporal: Bundle,
    info: dict[str, Any],
) -> Built:
    float_outs = np.load(work / "float.npy")
    float_metrics = data.metrics(float_outs)
    runs: dict[str, Scored] = {}
    pairs: dict[str, tuple[Artifact, Artifact]] = {}
    for precision in PAIRS:
        pair = _pair(feature, temporal, precision)
        if pair is not None:
            pairs[precision] = pair
            runs[f"litert-{precision}"] = _score_pair(req, data, feature, temporal, pair)
    if "int8" not in pairs:
        raise ConversionError("the feature or the temporal model has no int8 artifact")
    report: dict[str, Any] = {"feature_stage": _feature_section(feature, temporal, info)}
    if req.budget:
        report["budget"] = _budget(req, float_metrics, runs, pairs)
    f_arts, t_arts = [], []
    for precision, (f_art, t_art) in pairs.items():
        f_file, t_file = f"feature_{precision}.tflite", f"model_{precision}.tflite"
        shutil.copyfile(feature.path_of(f_art), stage / f_file)
        shutil.copyfile(temporal.path_of(t_art), stage / t_file)
        f_arts.append(f_art.model_copy(update={"file": f_file}))
        t_arts.append(t_art.model_copy(update={"file": t_file}))
    strategy = (
        f"feature stage: {feature.manifest.provenance.strategy} per frame; "
        f"temporal: {temporal.manifest.provenance.strategy}"
    )
    report["onnx"] = {"skipped": "no ONNX artifacts are made for a chained bundle yet"}
    return Built(
        t_arts,
        runs,
        float_outs,
        float_metrics,
        strategy,
        None,
        report,
        FeatureStage(artifacts=f_arts),
    )


def _budget(
    req: ConvertRequest,
    float_metrics: dict[str, Any],
    runs: dict[str, Scored],
    pairs: dict[str, tuple[Artifact, Artifact]],
) -> dict[str, Any]:
    """The int8 pair against the budget, end to end; a pair that misses it is not shipped."""
    attempts: list[dict[str, Any]] = []
    winner = None
    for precision in list(pairs):
        missed = B.misses(req.budget, float_metrics, runs[f"litert-{precision}"].metrics)
        attempts.append(
            {
                "rung": precision,
                "precision": precision,
                "met": not missed,
                "reason": "; ".join(missed) or "meets every budgeted metric",
            }
        )
        if not missed:
            winner = precision
            break
        del pairs[precision], runs[f"litert-{precision}"]
    if winner is None:
        raise ConversionError(
            "no feature + temporal pair meets the budget: " + attempts[-1]["reason"]
        )
    return {
        "budget": req.budget,
        "attempts": attempts,
        "winner": winner,
        "why": f"the {winner} pair meets the budget end to end (feature stage + temporal model)",
    }


def _feature_section(feature: Bundle, temporal: Bundle, info: dict[str, Any]) -> dict[str, Any]:
    """How the split went, and each part's own float-vs-converted numbers."""
    fm, tm = feature.manifest.metrics, temporal.manifest.metrics
    return {
        "frames": info["frames"],
        "features": info["features"],
        "split_at": info["wrapper"],
        "split_max_diff": info["max_diff"],
        "feature_vs_float": {k: v for k, v in fm.items() if k != "float"},
        "temporal_on_float_features": tm,
        "note": (
            "the feature model is scored as a regression of its float features; the temporal "
            "model was calibrated on int8 features and is scored here on float features; the "
            "report's variants are the pairs end to end against the whole float model"
        ),
    }
