"""The model zoo from the command line: list, train and build its models (``medge zoo``).

Bundles built here are cached by the content of the weights, the data, the settings and the
converting code (:func:`code_key`), so the demo converts each model once
(``$MEDGE_CACHE_DIR``, default ``~/.cache/medge``). A cached bundle is used only when it
loads (every file matches its hash) and says it was made from these very weights; anything
else is told in one line and rebuilt. The cache is the user's own: it protects against
stale and broken entries, not against someone who can write into it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent.bundle import Bundle
from edge_agent.errors import MedgeError

if TYPE_CHECKING:
    from converter import ConvertRequest
    from models.spec import ZooModel

__all__ = [
    "breast_cnn_bundle",
    "build",
    "cache_dir",
    "code_key",
    "describe",
    "find",
    "request",
    "train",
]

log = logging.getLogger("medge.zoo")


def cache_dir() -> Path:
    base = os.environ.get("MEDGE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "medge" if not os.environ.get("MEDGE_CACHE_DIR") else root


def find(name: str) -> ZooModel:
    """The zoo entry ``name`` (``breast_cnn`` or ``breast-cnn``); MedgeError lists the zoo."""
    try:
        import models
    except ImportError as exc:  # pragma: no cover - models/ ships with medge
        raise MedgeError(f"the model zoo is not installed ({exc})") from exc
    try:
        return models.spec(name.replace("-", "_"))
    except KeyError as exc:
        raise MedgeError(str(exc.args[0])) from exc


def describe(spec: ZooModel) -> dict[str, Any]:
    """One zoo entry as JSON for ``medge zoo list --json``."""
    return {
        "name": spec.name,
        "family": spec.family,
        "task": spec.task,
        "summary": spec.summary,
        "data": spec.data.name,
        "data_kind": spec.data_kind,
        "split": spec.split,
        "weights": spec.weights.name,
        "weights_bytes": spec.weights.stat().st_size if spec.weights.is_file() else None,
        "budget": spec.convert.get("budget", {}),
        "anchor": spec.anchor,
        "stream": spec.stream,
        "train": f"python -m {spec.module}",
    }


def _missing(spec: ZooModel) -> None:
    for what, path in (("weights", spec.weights), ("data", spec.data)):
        if not path.is_file():
            raise MedgeError(
                f"zoo model {spec.name}: its {what} {path} is missing"
                + (f" (python -m {spec.module} makes it)" if what == "weights" else "")
            )


def _files(value: Any) -> list[Path]:
    """Every file a spec's settings name (stream recordings, ...)."""
    if isinstance(value, Path):
        return [value] if value.is_file() else []
    if isinstance(value, dict):
        return [p for v in value.values() for p in _files(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _files(v)]
    return []


_ROOT = Path(__file__).resolve().parent.parent
_CODE_KEY: list[str] = []  # computed once per process
CONVERTING = ("tensorflow-cpu", "tf-keras", "ai-edge-litert", "onnxruntime", "tf2onnx")


def code_key() -> str:
    """sha256 of what converts a model besides its inputs: the converter's and the agent's
    source files, and the versions of the libraries that convert and run it."""
    if not _CODE_KEY:
        h = hashlib.sha256()
        for pkg in ("converter", "edge_agent"):
            for p in sorted((_ROOT / pkg).rglob("*.py")):
                h.update(p.relative_to(_ROOT).as_posix().encode() + b"\0" + p.read_bytes())
        for dist in CONVERTING:
            try:
                h.update(f"{dist}={version(dist)}".encode())
            except PackageNotFoundError:
                h.update(f"{dist}=none".encode())
        _CODE_KEY.append(h.hexdigest())
    return _CODE_KEY[0]


def _key(spec: ZooModel, profile: str, fields: dict[str, Any]) -> str:
    """The cache key: the bytes of every input file, the settings, the profile and the
    converting code."""
    h = hashlib.sha256(code_key().encode())
    for path in (spec.weights, spec.data, *_files(spec.convert)):
        h.update(hashlib.sha256(path.read_bytes()).digest())
    h.update(json.dumps([fields, profile], sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def _fields(spec: ZooModel, lean: bool) -> dict[str, Any]:
    fields: dict[str, Any] = dict(spec.convert)
    if lean:
        fields.update(onnx=False, float_artifacts="none")
    return fields


def request(
    spec: ZooModel,
    out: Path,
    profile: str = "x86",
    lean: bool = False,
    force: bool = False,
    sign_key: Path | None = None,
) -> ConvertRequest:
    """The converter request that builds zoo model ``spec`` into ``out``: its weights, its
    data for calibration and evaluation, its own settings. ``lean``: the deployed LiteRT file
    only (no ONNX, no float extras)."""
    try:
        from converter import ConvertRequest
    except ImportError as exc:
        raise MedgeError(
            "building a zoo bundle needs the converter: pip install 'medge[convert]'"
        ) from exc
    return ConvertRequest(
        model=spec.weights,
        calib=spec.data,
        eval=spec.data,
        out=out,
        profile=profile,
        name=spec.bundle_name,
        task=spec.task,
        force=force,
        sign_key=sign_key,
        **_fields(spec, lean),
    )


def build(
    name: str,
    profile: str = "x86",
    out: Path | None = None,
    force: bool = False,
    sign_key: Path | None = None,
    lean: bool = False,
) -> Bundle:
    """Convert zoo model ``name`` for ``profile``, signed with ``sign_key`` (a site's
    bundle-signer.key) if given. Without ``out`` the bundle is cached by the content of its
    inputs and reused (whoever deploys it signs it); with ``out`` it is written there.
    ``lean``: the deployed LiteRT file only (no ONNX, no float extras), as the demo needs: a
    fraction of the conversion time."""
    spec = find(name)
    _missing(spec)
    cached = out is None
    key = _key(spec, profile, _fields(spec, lean))
    target = out or cache_dir() / "bundles" / f"{spec.bundle_name}-{profile}-{key}"
    if cached and not force and target.exists():
        try:
            bundle = Bundle.load(target)
        except MedgeError as exc:
            log.warning("zoo cache: %s; rebuilding it", exc)
        else:
            made_from = bundle.manifest.provenance.source_sha256
            if made_from == hashlib.sha256(spec.weights.read_bytes()).hexdigest():
                return bundle
            log.warning(
                "zoo cache: %s was not made from %s; rebuilding it", target, spec.weights.name
            )
    req = request(spec, target, profile, lean, force or cached, sign_key)
    from converter import convert

    log.info("converting zoo model %s for %s (into %s)", spec.name, profile, target)
    return convert(req)


def breast_cnn_bundle(sign_key: Path | None = None) -> Bundle:
    """The demo's ultrasound model: the zoo's BreastMNIST CNN for x86, converted once."""
    return build("breast_cnn", sign_key=sign_key)


def train(name: str, args: list[str] | None = None) -> int:
    """Retrain zoo model ``name`` in a child process (``python -m models.NAME``)."""
    spec = find(name)
    if shutil.which(sys.executable) is None:  # pragma: no cover
        raise MedgeError(f"no Python interpreter at {sys.executable}")
    cmd = [sys.executable, "-m", spec.module, *(args or [])]
    log.info("training %s: %s", spec.name, " ".join(cmd))
    return subprocess.run(cmd, check=False).returncode
