"""Writing a bundle: a staging directory, the reports, the manifest with its provenance, and
the publication (signed, checked as a device checks it, renamed into place only when complete).

The manifest format is the agent's (edge_agent.bundle); this module only fills it in. Both a
converted and a wrapped model go through here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from converter.budget import append_markdown
from converter.data import Data, class_outputs
from converter.inputs import source_bytes, source_sha256
from converter.metrics import output_snr_db, roc_curve
from converter.reference import reference_for
from converter.regression import vs_float
from converter.report import write_html, write_markdown
from converter.request import ConvertRequest
from converter.scoring import Scored, agreement
from edge_agent.bundle import (
    CHAIN_SCHEMA_VERSION,
    SCHEMA_VERSION,
    Artifact,
    Bundle,
    CamSpec,
    Decode,
    FeatureStage,
    Manifest,
    Provenance,
    Reference,
    file_entry,
    sign_bundle,
    write_manifest,
)
from edge_agent.keys import load_signer_key

__all__ = [
    "Built",
    "finish",
    "finite",
    "medge_version",
    "provenance",
    "publish",
    "scalars",
    "staging",
    "write_bundle_manifest",
    "write_reports",
]

log = logging.getLogger("medge.convert")


def medge_version() -> str:
    try:
        return version("medge")
    except PackageNotFoundError:
        return "0+unknown"


def _sha256_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` (so the final rename stays on one file system),
    removed on the way out unless :func:`publish` renamed it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def scalars(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The plain numbers of a metrics section: what the manifest's ``metrics`` keeps."""
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, float | int | None) and not isinstance(v, bool)
    }


def finite(v: Any) -> Any:
    """JSON has no inf/nan: they become None (an exact reproduction reads as SNR None)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [finite(x) for x in v]
    return v


def write_reports(stage: Path, report: dict[str, Any]) -> None:
    """report.json, report.md (with the budget search and float-artifact decisions, when
    there are any) and report.html."""
    (stage / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(stage / "report.md", report)
    append_markdown(stage / "report.md", report)
    write_html(stage / "report.html", report)


def provenance(
    source_sha256: str, source_format: str, calibration: np.ndarray, strategy: str
) -> Provenance:
    """Where the bundle came from: the source's hash and format, this converter's version,
    the calibration samples' hash and count, and how the artifacts were made."""
    return Provenance(
        source_sha256=source_sha256,
        source_format=source_format,
        converter_version=medge_version(),
        calibration_sha256=_sha256_arrays(calibration),
        calibration_count=len(calibration),
        strategy=strategy,
    )


def write_bundle_manifest(
    stage: Path,
    req: ConvertRequest,
    *,
    name: str,
    task: str,
    decode: Decode,
    labels: list[str],
    artifacts: list[Artifact],
    metrics: dict[str, Any],
    provenance: Provenance,
    cam: CamSpec | None = None,
    feature: FeatureStage | None = None,
    reference: Reference | None = None,
) -> None:
    """The manifest of what ``stage`` holds (every file hashed), versioned by the time now;
    a bundle with a feature stage says schema 2.0 (edge_agent.bundle.CHAIN_SCHEMA_VERSION).
    ``reference``: the inputs' and scores' summary for the device's drift monitor."""
    files = {
        p.name: file_entry(p)
        for p in sorted(stage.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    now = datetime.now(timezone.utc)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION if feature is None else CHAIN_SCHEMA_VERSION,
        name=name,
        version=now.strftime("%Y%m%d.%H%M%S"),
        created=now.isoformat(timespec="seconds"),
        task=task,  # type: ignore[arg-type]  # str: pydantic validates it
        profile=req.profile,
        preprocess=req.preprocess,
        decode=decode,
        labels=labels,
        positive_label=req.positive_label,
        artifacts=artifacts,
        files=files,
        metrics=metrics,
        provenance=provenance,
        cam=cam,
        window=req.window,
        feature=feature,
        reference=reference,
    )
    write_manifest(stage, manifest)


def publish(stage: Path, req: ConvertRequest, warnings: list[str]) -> Bundle:
    """Sign the staged bundle, check it as a device would, and rename it into place."""
    trusted = None
    if req.sign_key is not None:
        key = load_signer_key(req.sign_key)
        sign_bundle(stage, key)
        trusted = [key.public_key()]
    else:
        log.warning("bundle is not signed (no --sign-key): devices will refuse it")
    Bundle.load(stage, trusted)  # the bundle we ship must pass the device's own checks
    if req.out.exists():
        shutil.rmtree(req.out)
    stage.rename(req.out)
    for w in warnings:
        log.warning("%s", w)
    return Bundle.load(req.out)


@dataclass
class Built:
    """The artifacts made and what they scored, before the manifest and report."""

    artifacts: list[Artifact]
    scored: dict[str, Scored]  # variant (runtime-precision) -> evaluated
    float_outs: np.ndarray
    float_metrics: dict[str, Any]
    strategy: str
    cam: CamSpec | None = None
    report: dict[str, Any] = field(default_factory=dict)  # extra report sections
    feature: FeatureStage | None = None  # a chained bundle's per-frame model (converter.chain)
    # the float model's outputs on each recording's windows, when there are recordings
    float_streams: list[np.ndarray] | None = None


def _agreement(data: Data, ref: np.ndarray, got: np.ndarray) -> float:
    if data.task == "classification":  # the classes the agent decodes
        return agreement(class_outputs(data, ref)[1], class_outputs(data, got)[1])
    return agreement(ref, got, data.task)


def _vs_float(data: Data, float_outs: np.ndarray, runs: dict[str, Scored]) -> dict[str, Any]:
    """Regression: each artifact's values against float's, in the measurement's units."""
    if data.task != "regression":
        return {}
    return {"vs_float": {k: vs_float(float_outs, s.outputs) for k, s in runs.items()}}


def finish(
    req: ConvertRequest, fmt: str, data: Data, stage: Path, built: Built, warnings: list[str]
) -> Bundle:
    runs, arts = built.scored, built.artifacts
    report: dict[str, Any] = {
        "model": req.model.name,
        "format": fmt,
        "task": data.task,
        "profile": req.profile,
        "labels": data.labels,
        "positive_label": req.positive_label,
        "eval": {"file": req.eval.name, "n": len(data.xe)},
        "variants": ["float", *runs],
        "float": built.float_metrics,
        **{k: s.metrics for k, s in runs.items()},
        "agreement": {k: _agreement(data, built.float_outs, s.outputs) for k, s in runs.items()},
        "output_snr_db": {k: output_snr_db(built.float_outs, s.outputs) for k, s in runs.items()},
        **_vs_float(data, built.float_outs, runs),
        "size_bytes": {
            fmt: source_bytes(req.model),
            **{f"{a.runtime}-{a.precision}": _bytes(stage, a, built.feature) for a in arts},
        },
        "latency_ms": {
            k: {"p50": s.p50_ms, "p99": float(np.percentile(s.latencies, 99) * 1e3)}
            for k, s in runs.items()
        },
        **built.report,
        "warnings": warnings,
    }
    if data.task == "classification" and data.positive is not None:
        curves = {"float": built.float_outs, **{k: s.outputs for k, s in runs.items()}}
        report["roc"] = {}
        for k, outs in curves.items():
            scores = class_outputs(data, outs)[0][:, data.positive]
            fpr, tpr = roc_curve(data.y == data.positive, scores)
            report["roc"][k] = {"fpr": fpr, "tpr": tpr}
    report = finite(report)
    write_reports(stage, report)

    name = req.name or (req.model.stem if req.model.is_file() else req.model.name)
    write_bundle_manifest(
        stage,
        req,
        name=name,
        task=data.task,
        decode=data.decode,
        labels=data.labels,
        artifacts=built.artifacts,
        metrics={k: scalars(report[k]) for k in report["variants"]},
        provenance=provenance(source_sha256(req.model), fmt, data.xc, built.strategy),
        cam=built.cam,
        feature=built.feature,
        reference=_reference(data, built),
    )
    return publish(stage, req, warnings)


def _reference(data: Data, built: Built) -> Reference | None:
    """converter.reference: the recordings' windows (else the calibration samples) and the
    float model's scores on them (else on the evaluation samples)."""
    recordings = [s.x for s in data.streams]
    scores, source = None, "evaluation"
    if data.task == "classification":
        if recordings and built.float_streams is not None:
            outs, source = np.concatenate(built.float_streams), "recordings"
        else:
            outs = built.float_outs
        scores = class_outputs(data, outs)
    return reference_for(
        built.artifacts[0],
        built.feature is not None,
        data.xc,
        recordings,
        scores,
        source,
        data.labels,
        data.positive,
    )


def _bytes(stage: Path, art: Artifact, feature: FeatureStage | None) -> int:
    """An artifact's size on the device: with its feature artifact, for a chained bundle."""
    size = (stage / art.file).stat().st_size
    for f in feature.artifacts if feature else []:
        if (f.runtime, f.precision) == (art.runtime, art.precision):
            size += (stage / f.file).stat().st_size
    return size
