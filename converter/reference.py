"""The manifest's ``reference``: what the inputs and the float model's scores looked like on
the data the model was validated with, for the device's drift monitor (edge_agent.drift).

Inputs are summarised raw, before preprocessing: what a device's source gives
(``Work.sample.data``). With recordings (``--stream``) they come from the recordings cut into
windows, which the converter reads as the agent's sources read them (the units a device sees:
the zoo ECG's calibration windows are stored as int16 ADC counts, its recording in mV); else
from the calibration samples. A classifier's scores come from the float model on the same
recordings, else on the evaluation samples (held out: on the calibration samples, the training
split by default, a model is more confident than on new data). The summaries themselves are
edge_agent.reference's, so that both sides bin alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from edge_agent.bundle import Artifact, Reference
from edge_agent.reference import (
    QUANTILE_LEVELS,
    summarize_images,
    summarize_scores,
    summarize_signal,
)

__all__ = ["input_kind", "reference_for"]

log = logging.getLogger("medge.convert")

_IMAGE_LAYOUTS = {"NHWC": False, "NCHW": False, "NTHWC": True}  # layout -> samples are clips


def input_kind(artifact: Artifact, chained: bool, sample_ndim: int) -> tuple[str, bool]:
    """(``signal`` or ``image``, samples are clips) for a bundle's first artifact: a chained
    bundle takes clips of frames; an image layout takes images; (L, C) windows are signals."""
    if chained:
        return "image", True
    layout = artifact.inputs[0].layout
    if layout in _IMAGE_LAYOUTS:
        return "image", _IMAGE_LAYOUTS[layout]
    if layout is None and sample_ndim >= 3:
        return "image", sample_ndim >= 4
    return "signal", False


def reference_for(
    artifact: Artifact,
    chained: bool,
    calibration: np.ndarray,
    recordings: Sequence[np.ndarray] = (),
    scores: tuple[np.ndarray, np.ndarray] | None = None,
    scores_from: str = "evaluation",
    labels: Sequence[str] = (),
    positive: int | None = None,
) -> Reference | None:
    """The reference of raw ``calibration`` samples, or of the ``recordings``' windows when
    there are any; with ``scores`` (decoded class scores (N, K) and predictions (N,) of the
    float model, from ``scores_from``) their distribution. None, with a log line, when the
    samples have a shape it cannot summarise."""
    source = "recordings" if len(recordings) else "calibration"
    x = np.concatenate(list(recordings)) if len(recordings) else np.asarray(calibration)
    kind, clip = input_kind(artifact, chained, x.ndim - 1)
    if len(x) == 0 or (kind == "signal" and x.ndim not in (2, 3)):
        log.info("no input reference: samples of shape %s", x.shape[1:])
        return None
    ref = Reference(
        kind=kind,  # type: ignore[arg-type]  # str: pydantic validates it
        source=source,  # type: ignore[arg-type]
        count=len(x),
        quantile_levels=list(QUANTILE_LEVELS) if kind == "signal" else [],
        channels=summarize_signal(x) if kind == "signal" else [],
        image=summarize_images(x, clip) if kind == "image" else None,
    )
    if scores is not None and len(scores[0]):
        s, pred = scores
        summary = summarize_scores(s, pred, list(labels), positive, scores_from)
        ref = ref.model_copy(update={"scores": summary})
    return ref
