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
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from converter.budget import append_markdown
from converter.report import write_html, write_markdown
from converter.request import ConvertRequest
from edge_agent.bundle import (
    SCHEMA_VERSION,
    Artifact,
    Bundle,
    CamSpec,
    Decode,
    Manifest,
    Provenance,
    file_entry,
    sign_bundle,
    write_manifest,
)
from edge_agent.keys import load_signer_key

__all__ = [
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
) -> None:
    """The manifest of what ``stage`` holds (every file hashed), versioned by the time now."""
    files = {
        p.name: file_entry(p)
        for p in sorted(stage.iterdir())
        if p.is_file() and p.name != "manifest.json"
    }
    now = datetime.now(timezone.utc)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        name=name,
        version=now.strftime("%Y%m%d.%H%M%S"),
        created=now.isoformat(timespec="seconds"),
        task=task,  # type: ignore[arg-type]
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
