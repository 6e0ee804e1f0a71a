"""Build (and cache) the bundle of the zoo's reference model for the demo."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from edge_agent.bundle import Bundle, Preprocess
from edge_agent.errors import MedgeError

__all__ = ["breast_cnn_bundle", "cache_dir"]

log = logging.getLogger("medge.zoo")


def cache_dir() -> Path:
    base = os.environ.get("MEDGE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) if base else Path.home() / ".cache"
    return root / "medge" if not os.environ.get("MEDGE_CACHE_DIR") else root


def breast_cnn_bundle() -> Bundle:
    """The BreastMNIST CNN as a full-int8 LiteRT bundle, converted once and then reused."""
    try:
        from converter import ConvertRequest, convert
        from models import breast_cnn
    except ImportError as exc:
        raise MedgeError(
            "building the demo bundle needs the converter: pip install 'medge[convert]' "
            "(or pass --bundle DIR)"
        ) from exc
    key = hashlib.sha256(breast_cnn.WEIGHTS.read_bytes()).hexdigest()[:12]
    out = cache_dir() / "bundles" / f"breast-cnn-{key}"
    try:
        return Bundle.load(out)
    except MedgeError:
        pass
    log.info("converting the zoo's breast_cnn to full int8 (once; cached in %s)", out)
    return convert(
        ConvertRequest(
            model=breast_cnn.WEIGHTS,
            calib=breast_cnn.DATA,
            eval=breast_cnn.DATA,
            out=out,
            profile="x86",
            preprocess=Preprocess(kind="scale01"),
            labels=breast_cnn.CLASS_NAMES,
            positive_label=breast_cnn.POSITIVE,
            calib_split="train",
            eval_split="val",
            name="breast-cnn",
            force=True,
            float_artifacts="none",  # the int8 file only, on any machine
        )
    )
