"""The pipeline's stages and its graph: source > window > model > preprocess > infer > decode >
result > events > publish (:func:`build_graph`, the one place they are wired).

Each stage is thin: its work is a plain function (``Model.prepare``/``infer``/``decode``,
:func:`result_body`, ``EventTracker.update``); the stage times it, and a sample it rejects is
counted, told in one line (``edge_agent.graph.reject``) and skipped by the stages after it.
Windowing is decided from the manifest and the source kind (``edge_agent.sources.open_source``,
``edge_agent.window.Window``); the model for each sample from the slot, with the probation
after an update (``edge_agent.model_slot.Probation``); events from the manifest's
``decode.events`` (``edge_agent.events``), timed by the samples' own times.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from edge_agent.cam import cam_body
from edge_agent.decode import Classification, Decoded, ImageResult, Segmentation
from edge_agent.drift import WatchInputs
from edge_agent.errors import MedgeError
from edge_agent.events import EventTracker
from edge_agent.graph import Graph, Operator, Work, reject
from edge_agent.model import Model
from edge_agent.pictures import PictureCap
from edge_agent.shadow import Compare, ShadowRun
from edge_agent.source_ids import SourceUids
from edge_agent.sources.base import Sample
from edge_agent.telemetry import PipelineStats
from edge_agent.thumbnail import input_thumbnail, takes_images
from edge_agent.window import Window

__all__ = [
    "Bind",
    "Decode",
    "Events",
    "Infer",
    "Preprocess",
    "Publish",
    "Result",
    "build_graph",
    "result_body",
    "run_pipeline",
]

log = logging.getLogger("medge.agent.pipeline")

Emit = Callable[[str, dict[str, Any]], None]
SealSource = Callable[[SourceUids, int | None], dict[str, Any]]
clock = time.perf_counter


def build_graph(
    source: Any,
    window: Window,
    models: Operator,
    emit: Emit,
    stats: PipelineStats,
    cam: bool = True,
    thumbnails: bool = True,
    pictures_max_hz: float | None = None,
    seal_source: SealSource | None = None,
    compare: Callable[[], list[ShadowRun]] | None = None,
    watch: WatchInputs | None = None,
) -> Graph:
    """The agent's pipeline. ``source``: a source (or an iterable of samples); ``models``: the
    stage that binds each sample to its model (:class:`Bind`, or ``Probation`` over a slot).
    ``thumbnails``: add a small picture of the input to results of image models; ``cam``: the
    heatmap, when the bundle has one; ``pictures_max_hz``: how many results a second carry
    them at most (:class:`edge_agent.pictures.PictureCap`; None: every result);
    ``seal_source``: seals a DICOM sample's UIDs into the result's ``source`` field
    (:class:`edge_agent.source_ids.SourceSealer`; None: results carry none); ``compare``: the
    models to run beside the published one on a share of samples (a rollout's candidate, the
    float check: :mod:`edge_agent.shadow`), only counted; ``watch``: the input drift and
    signal-quality monitor (:class:`edge_agent.drift.WatchInputs`), whose warnings go out as
    events."""
    cap = PictureCap(pictures_max_hz, stats, cam, thumbnails)
    preprocess, infer, decode = Preprocess(stats), Infer(stats, cam), Decode(stats, cam, cap)
    result, events = Result(thumbnails, seal_source), Events(emit, stats)
    publish = Publish(emit, stats)
    g = Graph("pipeline")
    g.add_flow(source, window)  # samples, cut as the manifest and the source kind say
    g.add_flow(window, models)  # the model each sample runs on (swaps happen here)
    g.add_flow(models, preprocess)
    g.add_flow(preprocess, infer)
    g.add_flow(infer, decode)
    if compare is not None:
        shadow = Compare(compare)
        g.add_flow(decode, shadow)  # beside the published model, on the same samples
        g.add_flow(shadow, result)
    else:
        g.add_flow(decode, result)
    if watch is not None:
        g.add_flow(result, watch)  # drift and signal quality, per bundle
        g.add_flow(watch, events)
    else:
        g.add_flow(result, events)  # events close when the model changes
    g.add_flow(events, publish)  # into the outbox: a `block` edge, nothing dropped
    return g


def run_pipeline(
    samples: Iterable[Sample],
    model: Model,
    emit: Emit,
    stats: PipelineStats,
    cam: bool = True,
    thumbnails: bool = True,
    pictures_max_hz: float | None = None,
    compare: Callable[[], list[ShadowRun]] | None = None,
    watch: WatchInputs | None = None,
) -> None:
    """Run every sample through ``model`` and ``emit`` each result (and each event).
    ``cam``, ``thumbnails``, ``pictures_max_hz``, ``compare``, ``watch``: as
    :func:`build_graph` says."""
    graph = build_graph(
        samples,
        Window(None),
        Bind(model),
        emit,
        stats,
        cam,
        thumbnails,
        pictures_max_hz,
        compare=compare,
        watch=watch,
    )
    graph.run(threading.Event())


class Bind:
    """Stage: every sample runs on one model."""

    def __init__(self, model: Model) -> None:
        self.model = model

    def __call__(self, samples: Iterable[Sample]) -> Iterator[Work]:
        for sample in samples:
            yield Work(sample, self.model)


class Preprocess:
    """Stage: raw sample -> input tensor (unless probation made it already)."""

    def __init__(self, stats: PipelineStats) -> None:
        self.stats = stats

    def __call__(self, works: Iterable[Work]) -> Iterator[Work]:
        for w in works:
            if w.rejected is None and w.x is None:
                t0 = clock()
                try:
                    w.x = w.model.prepare(w.sample.data)
                except (MedgeError, ValueError) as exc:
                    reject(w, "preprocess", self.stats, exc)
                w.took("preprocess", clock() - t0)
            yield w


class Infer:
    """Stage: input tensor -> outputs; a runtime that fails on one input loses that sample,
    not the stream. ``cam``: every output, when the bundle has a CAM."""

    def __init__(self, stats: PipelineStats, cam: bool = True) -> None:
        self.stats, self.cam = stats, cam

    def __call__(self, works: Iterable[Work]) -> Iterator[Work]:
        for w in works:
            if w.rejected is None:
                t0 = clock()
                spec = w.model.bundle.manifest.cam if self.cam else None
                try:
                    if spec is not None:
                        w.outputs = w.model.infer_outputs(w.x)  # type: ignore[arg-type]
                        w.y = w.outputs[0].reshape(-1)
                    elif w.y is None:  # else computed and checked on probation
                        w.y = w.model.infer(w.x)  # type: ignore[arg-type]
                except (MedgeError, ValueError, RuntimeError) as exc:
                    reject(w, "infer", self.stats, exc)
                w.took("infer", clock() - t0)
            yield w


class Decode:
    """Stage: first output -> the task's result; then whether the result carries pictures
    (``cap``), and the CAM heatmap when asked and it does."""

    def __init__(
        self, stats: PipelineStats, cam: bool = True, cap: PictureCap | None = None
    ) -> None:
        self.stats, self.cam, self.cap = stats, cam, cap

    def __call__(self, works: Iterable[Work]) -> Iterator[Work]:
        for w in works:
            if w.rejected is None:
                t0 = clock()
                try:
                    c = w.decoded = w.model.decode(w.y)  # type: ignore[arg-type]
                except (MedgeError, ValueError) as exc:
                    reject(w, "decode", self.stats, exc)
                else:
                    if self.cap is not None:
                        w.pictured = self.cap.take(c, w.model)
                    spec = w.model.bundle.manifest.cam if self.cam else None
                    if w.outputs is not None and spec is not None and w.pictured:
                        heat = w.outputs[spec.output]
                        w.extra["cam"] = cam_body(heat, c.pred, c.pred_label, spec.upsample_to)
                w.took("decode", clock() - t0)
            yield w


class Result:
    """Stage: the result message of each decoded sample; with ``thumbnails``, a small picture
    of the input when the model takes images (:mod:`edge_agent.thumbnail`); with
    ``seal_source``, a DICOM sample's UIDs sealed to the fog node (``source``)."""

    def __init__(self, thumbnails: bool = True, seal_source: SealSource | None = None) -> None:
        self.thumbnails, self.seal_source = thumbnails, seal_source

    def __call__(self, works: Iterable[Work]) -> Iterator[Work]:
        for w in works:
            if w.rejected is None and w.decoded is not None:
                c, lat = w.decoded, w.latency
                lat["total"] = lat["preprocess"] + lat["infer"] + lat["decode"]
                body = result_body(w.sample, c.pred, c.pred_label, _scores(c), w.model, lat)
                body.update(_task_fields(c), **w.extra)
                if self.thumbnails and w.pictured and takes_images(w.model.bundle.manifest):
                    thumb = input_thumbnail(w.sample.data)
                    if thumb is not None:
                        body["thumbnail"] = thumb
                if self.seal_source is not None and w.sample.dicom is not None:
                    body["source"] = self.seal_source(w.sample.dicom, w.sample.meta.get("frame"))
                w.messages.append(("result", body))
            yield w


class Events:
    """Stage: the manifest's event rules over the classifications, one tracker per model.
    When the model changes (an update, a rollback), the open events of the old one end first;
    at the end of the stream the open events end, straight into ``emit`` (the outbox). A
    window whose time goes back (a looped recording, a clock reset) is told in one line and
    counted in the telemetry (``events.time_resets``), as are suppressed onsets."""

    def __init__(self, emit: Emit, stats: PipelineStats | None = None) -> None:
        self.emit, self.stats = emit, stats or PipelineStats()

    def __call__(self, works: Iterable[Work]) -> Iterator[Work]:
        tracker: EventTracker | None = None
        tracked: object = None
        try:
            for w in works:
                bundle = w.model.bundle
                if bundle is not tracked:
                    w.messages[:0] = _close(tracker)
                    tracker, tracked = _tracker(w.model), bundle
                c = w.decoded
                if w.rejected is None and tracker is not None and isinstance(c, Classification):
                    at = w.sample.time if w.sample.time is not None else time.time()
                    w.messages += [("event", e) for e in self._update(tracker, at, c, w)]
                yield w
        finally:
            for kind, body in _close(tracker):
                self.emit(kind, body)

    def _update(
        self, tracker: EventTracker, at: float, c: Classification, w: Work
    ) -> list[dict[str, Any]]:
        resets, suppressed = tracker.time_resets, sum(tracker.suppressed.values())
        last = tracker.last_time
        out = tracker.update(at, c.scores, w.sample.id)
        if tracker.time_resets > resets:
            n = self.stats.event_note("time_resets")
            ended = sum(1 for e in out if e.get("ended_by") == "time_reset")
            looped = w.sample.meta.get("loop")
            if looped is not None:  # the source said so: a recording played again, by config
                log.info(
                    "sample %s: the recording starts again (pass %d): %d open event(s) "
                    "ended, refractory times cleared",
                    w.sample.id,
                    looped + 1,
                    ended,
                )
            else:
                log.warning(
                    "sample %s: time went back from %.3f to %.3f (a clock reset; %d so far): "
                    "%d open event(s) ended, refractory times cleared",
                    w.sample.id,
                    last,
                    at,
                    n,
                    ended,
                )
        gone = sum(tracker.suppressed.values()) - suppressed
        if gone:
            self.stats.event_note("suppressed", gone)
        return out


class Publish:
    """Sink: each message into ``emit`` (the outbox), then the sample's timings."""

    def __init__(self, emit: Emit, stats: PipelineStats) -> None:
        self.emit, self.stats = emit, stats

    def __call__(self, works: Iterable[Work]) -> Iterator[Work]:
        for w in works:
            for kind, body in w.messages:
                self.emit(kind, body)
            if w.rejected is None:
                self.stats.record(**w.latency)
            yield w


def _tracker(model: Model) -> EventTracker | None:
    m = model.bundle.manifest
    if m.task != "classification" or not m.decode.events:
        return None
    return EventTracker(m.decode.events, m.labels)


def _close(tracker: EventTracker | None) -> list[tuple[str, dict[str, Any]]]:
    if tracker is None:
        return []
    ended = [("event", event) for event in tracker.finish()]
    if tracker.suppressed:
        log.info("events suppressed by their refractory time: %s", tracker.suppressed)
    return ended


def _scores(c: Decoded) -> list[float]:
    return c.scores if isinstance(c, Classification) else []


def _task_fields(c: Decoded) -> dict[str, Any]:
    if isinstance(c, Segmentation):
        return {"mask": c.body()}
    if isinstance(c, ImageResult):
        return {"image": c.body()}
    return {}


def result_body(
    sample: Sample,
    pred: int,
    pred_label: str,
    scores: list[float],
    model: Model,
    latency: dict[str, float],
) -> dict[str, Any]:
    manifest = model.bundle.manifest
    labels = manifest.labels
    truth = sample.label if sample.label is not None and 0 <= sample.label < len(labels) else None
    body = {
        "input": sample.id,
        # audit: which exact input produced this result (never the input itself)
        "input_sha256": hashlib.sha256(np.ascontiguousarray(sample.data).tobytes()).hexdigest(),
        "sample_time": sample.time,  # the source's time: recorded for a replay
        "pred": pred,
        "pred_label": pred_label,
        "scores": [round(s, 6) for s in scores],
        "label": truth,
        "label_name": labels[truth] if truth is not None else None,
        "latency_ms": round(latency["total"] * 1000.0, 3),
        "bundle": model.bundle.id,
    }
    if manifest.positive_label is not None:  # the dashboard marks it among the scores
        body["positive_label"] = manifest.positive_label
    return body
