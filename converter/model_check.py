"""Is the model file what its name says? Checked in the parent process, before any child
imports TensorFlow, so a damaged file reads as damaged ("model.keras is not a Keras model:
...") and not as missing, which is what Keras itself says of a file it cannot unzip.

Also reads the input shape of ONNX and LiteRT models (with the agent's own backends) for
converter.layout. No TensorFlow here.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionError
from edge_agent.errors import MedgeError

__all__ = ["check_model_file", "input_shape", "output_width"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_WHAT = {"keras": "Keras", "h5": "Keras HDF5", "onnx": "ONNX", "tflite": "LiteRT"}


def check_model_file(path: Path, fmt: str) -> None:
    """One line when the file is not a model of its format."""
    why = _why_not(path, fmt)
    if why:
        raise ConversionError(f"{path.name} is not a {_WHAT[fmt]} model: {why}")


def _why_not(path: Path, fmt: str) -> str | None:
    if fmt == "keras":
        return _keras_problem(path)
    if fmt == "onnx":
        return _onnx_problem(path)
    if fmt not in ("h5", "tflite"):
        return None  # a SavedModel directory: TensorFlow reads it, and says why it cannot
    with path.open("rb") as f:
        head = f.read(16)
    if fmt == "h5" and not head.startswith(_HDF5_MAGIC):
        return "no HDF5 signature"
    if fmt == "tflite" and head[4:8] != b"TFL3":
        return "no TFL3 flatbuffer identifier"
    return None


def _keras_problem(path: Path) -> str | None:
    if not zipfile.is_zipfile(path):
        return "not a zip archive (a .keras file is one, with config.json inside)"
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile) as exc:
        return f"damaged zip archive ({exc})"
    return None if "config.json" in names else "no config.json in the archive"


def _onnx_problem(path: Path) -> str | None:
    try:
        import onnx
    except ImportError:  # the agent's runtime still refuses a bad file in one line
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    if not model.graph.node or not model.graph.input:
        return "no graph (no nodes or no inputs)"
    return None


def input_shape(path: Path, fmt: str) -> list[int] | None:
    """The first input's shape (with batch) of an ONNX or LiteRT model, read by the agent's own
    backend; None for the formats TensorFlow reads (their children check the shape)."""
    spec = _tensors(path, fmt)
    return list(spec[0][0].shape) if spec else None


def output_width(path: Path, fmt: str) -> int | None:
    """How many values the first output holds per sample (ONNX, LiteRT); None otherwise."""
    spec = _tensors(path, fmt)
    if not spec or -1 in spec[1][0].shape[1:]:
        return None
    shape = spec[1][0].shape
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


def _tensors(path: Path, fmt: str) -> tuple[list[Any], list[Any]] | None:
    runtime = {"onnx": "onnx", "tflite": "litert"}.get(fmt)
    if runtime is None:
        return None
    from edge_agent.backends import open_backend

    try:
        backend = open_backend(runtime, path)
    except MedgeError as exc:
        raise ConversionError(str(exc)) from None
    return list(backend.inputs), list(backend.outputs)
