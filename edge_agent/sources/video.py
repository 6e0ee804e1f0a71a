"""Video through OpenCV: a file, a camera index or a stream URL (RTSP, HTTP).

A file is read in the caller's thread and never drops a frame (``realtime`` paces it at its
recorded rate). A live source (camera, URL, or a file with ``live: true``) is read by its own
thread into a ``drop_oldest`` port (``edge_agent.ports``) of ``queue`` frames: the *oldest*
frame goes when it is full, counted (``errors['dropped']``), so a slow model never stalls
the camera. A frame that fails to decode is counted and told in one line; the stream goes on.
"""

from __future__ import annotations

import csv
import logging
import re
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from edge_agent.errors import SourceError
from edge_agent.ports import Port
from edge_agent.sources.base import (
    Problems,
    Sample,
    Size,
    SourceSettings,
    mark_pass,
    pace,
    require,
)
from edge_agent.sources.frame_pacer import FramePacer
from edge_agent.window import WindowSettings

__all__ = ["VideoSettings", "VideoSource", "frame_labels", "load_intervals"]

log = logging.getLogger("medge.agent.source.video")

Interval = tuple[str, float, float]


class VideoSettings(SourceSettings):
    kind: Literal["video"] = Field(default="video", description="Source plug-in: OpenCV video.")
    path: Path | None = Field(default=None, description="Video file (one of path/camera/url).")
    camera: int | None = Field(default=None, ge=0, description="Camera index (/dev/videoN).")
    url: str | None = Field(default=None, description="Stream URL, e.g. rtsp://host/stream.")
    live: bool | None = Field(
        default=None,
        description="Read in a thread into a drop-oldest queue; default: true for camera/url.",
    )
    queue: int = Field(default=2, ge=1, le=16, description="Live queue size in frames.")
    color: Literal["rgb", "bgr", "grey"] = Field(
        default="rgb", description="Frame layout: HxWx3 RGB or BGR, or HxW grey (uint8)."
    )
    size: Size | None = Field(
        default=None, description="Resize every frame to (height, width); none keeps it."
    )
    step: int = Field(default=1, ge=1, description="Keep every step-th frame.")
    realtime: bool = Field(
        default=False, description="Replay a file at its recorded fps; false: as fast as possible."
    )
    loop: bool = Field(default=False, description="Start a file again at its end.")
    limit: int | None = Field(default=None, ge=1, description="Stop after this many frames.")
    labels: Path | None = Field(
        default=None, description="CSV of time intervals per clip (GMDCSA24 'Classes' column)."
    )
    labels_row: str | None = Field(
        default=None, description="'File Name' of this clip in the CSV; default: NN.mp4 from -NN."
    )
    positive: str = Field(
        default="Falling", description="Frames inside an interval whose class starts so are 1."
    )
    max_failures: int = Field(
        default=25, ge=1, description="Consecutive unreadable frames that end a file (or reopen)."
    )
    clip: WindowSettings | None = Field(
        default=None, description="Assemble (K, H, W, C) clips of K=length frames every hop."
    )

    @model_validator(mode="after")
    def _one_input(self) -> VideoSettings:
        given = [k for k in ("path", "camera", "url") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, camera, url (got {given or 'none'})")
        return self


def load_intervals(csv_path: Path, row: str) -> list[Interval]:
    """(class, start_s, end_s) for one clip of a GMDCSA24-style CSV ('File Name', 'Classes')."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = [{k.strip(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(f)]
    except OSError as exc:
        raise SourceError(f"{csv_path}: cannot read labels ({exc.strerror})") from exc
    match = [r for r in rows if r.get("File Name") == row]
    if not match:
        raise SourceError(f"{csv_path}: no row with File Name '{row}'")
    out: list[Interval] = []
    for name, spans in re.findall(r"([^\[\];]+?)\s*\[([^\]]*)\]", match[0].get("Classes", "")):
        for span in spans.split(";"):
            a, _, b = span.partition(" to ")
            try:
                out.append((name.strip(), float(a), float(b)))
            except ValueError as exc:
                raise SourceError(f"{csv_path}: row '{row}': bad interval '{span}'") from exc
    return out


def frame_labels(intervals: list[Interval], t: float, positive: str) -> tuple[int, list[str]]:
    """Label (1 if a class starting with ``positive`` covers ``t``) and the classes active."""
    active = sorted({c for c, a, b in intervals if a <= t <= b})
    return int(any(c.startswith(positive) for c in active)), active


class VideoSource:
    def __init__(self, cfg: VideoSettings) -> None:
        self.cfg = cfg
        self.live = cfg.live if cfg.live is not None else cfg.path is None
        if cfg.path is not None:
            if not cfg.path.is_file():
                raise SourceError(f"{cfg.path}: no such video file")
            self.name = cfg.path.stem
        else:
            self.name = f"camera{cfg.camera}" if cfg.camera is not None else _safe_url(cfg.url)
        self.intervals: list[Interval] = []
        if cfg.labels is not None:
            row = cfg.labels_row or _row_of(self.name)
            self.intervals = load_intervals(cfg.labels, row)
        self.fps = 0.0
        # a camera or stream: frames kept by time at the model's clip rate (set by
        # open_source from the bundle's window.rate_hz; edge_agent.sources.frame_pacer)
        self.pace_hz: float | None = None
        self._problems = Problems(self.name, log)
        self.port: Port[tuple[int, float, np.ndarray]] = Port(
            f"{self.name}:frames", cfg.queue, "drop_oldest", on_drop=self._dropped
        )  # the live edge: the camera never waits for the model

    @property
    def ports(self) -> list[Port[Any]]:
        """The queues between its threads: the live frame port, when it reads live."""
        return [self.port] if self.live else []

    @property
    def dropped(self) -> int:
        """Frames the live port dropped (the oldest, for a newer one)."""
        return self.port.drops

    def _dropped(self, n: int) -> None:
        self._problems.add(
            "dropped", "slow consumer: dropped the oldest frame", every=False, count=n
        )

    @property
    def errors(self) -> dict[str, int]:
        return self._problems.snapshot()

    def recorded_fps(self) -> float | None:
        """The file's frame rate as its container says (None for a camera or a stream, whose
        rate is what it delivers, and for a file that does not say)."""
        if self.cfg.path is None:
            return None
        cap = self._open()
        cap.release()
        return self.fps or None

    def _open(self) -> Any:
        cv2 = require("cv2")
        c = self.cfg
        target: Any = (
            str(c.path) if c.path is not None else c.camera if c.camera is not None else c.url
        )
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            raise SourceError(f"{self.name}: cannot open video source")
        if c.path is None:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the freshest frame, where the backend allows
        self.fps = float(cap.get(cv2.CAP_PROP_FPS)) or 0.0
        return cap

    def _frames(self, stop: threading.Event) -> Generator[tuple[int, float, np.ndarray]]:
        """(index, time, BGR frame) of every step-th readable frame; decode failures counted."""
        cv2 = require("cv2")
        c, recorded = self.cfg, self.cfg.path is not None
        lost, opened = 0, False
        while not stop.is_set():
            try:
                cap = self._open()
            except SourceError:
                if recorded or not opened:
                    raise
                lost += 1
                stop.wait(min(10.0, 0.5 * 2**lost))
                continue
            opened = True
            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) if recorded else 0
            start, index, failed = time.monotonic(), -1, 0
            try:
                while not stop.is_set():
                    index += 1
                    if total > 0 and index >= total:
                        break
                    keep = index % c.step == 0
                    ok, frame = cap.read() if keep else (cap.grab(), None)
                    if not ok:
                        failed += 1
                        if failed >= c.max_failures:
                            self._problems.add(
                                "decode", "%d frames in a row failed at frame %d", failed, index
                            )
                            break
                        continue
                    for k in range(index - failed, index):  # failures followed by a frame
                        self._problems.add("decode", "frame %d failed to decode; skipped", k)
                    failed, lost = 0, 0
                    if frame is None:
                        continue
                    t = index / self.fps if recorded and self.fps > 0 else time.time()
                    if recorded and c.realtime and self.fps > 0 and not pace(stop, start, t):
                        return
                    yield index, t, frame
            finally:
                cap.release()
            if recorded and not c.loop:
                return
            if not recorded and not stop.is_set():
                lost += 1
                self._problems.add("reopen", "stream lost after frame %d; reopening", index)
                stop.wait(min(10.0, 0.5 * 2**lost))

    def _shape(self, frame: np.ndarray) -> np.ndarray:
        cv2 = require("cv2")
        c = self.cfg
        if c.size is not None and frame.shape[:2] != c.size:
            h, w = c.size
            shrink = h * w < frame.shape[0] * frame.shape[1]
            inter = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
            frame = cv2.resize(frame, (w, h), interpolation=inter)
        if c.color == "rgb":
            return np.ascontiguousarray(frame[..., ::-1])
        if c.color == "grey":
            return cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        return frame

    def _live(self, stop: threading.Event) -> Generator[tuple[int, float, np.ndarray]]:
        """Frames from a reader thread through the drop-oldest port."""
        port, done = self.port, threading.Event()
        halt = threading.Event()  # set when the consumer ends: on stop, at its limit, on close
        failure: list[BaseException] = []
        port.clear()

        def reader() -> None:
            try:
                for item in self._frames(halt):
                    port.put(item)
            except BaseException as exc:  # handed to the consumer, raised there
                failure.append(exc)
            finally:
                done.set()

        th = threading.Thread(target=reader, daemon=True, name=f"video-{self.name}")
        th.start()
        try:
            while not stop.is_set():
                item = port.get(0.1)
                if item is not None:
                    yield item
                elif done.is_set() and not port.depth():
                    break
        finally:
            halt.set()
            th.join(timeout=5)
        if failure:
            raise failure[0]

    def _paced(self, frames: Iterator[tuple[int, float, np.ndarray]]) -> Generator[tuple]:
        """(index, time, frame, starts afresh) of the frames due at ``pace_hz``; a gap or a
        camera too slow for the model is counted, and its frame starts a fresh clip."""
        pacer = FramePacer(self.pace_hz) if self.pace_hz and self.cfg.path is None else None
        for index, t, frame in frames:
            if pacer is None:
                yield index, t, frame, False
                continue
            kept = pacer.offer(t)
            if not kept.keep:
                continue
            if kept.reason == "gap":
                self._problems.add(
                    "gap", "no frame for %.2f s (a stall or frames dropped): the clip starts "
                    "afresh", kept.seconds, every=False,
                )  # fmt: skip
            elif kept.reason == "clock":
                self._problems.add(
                    "clock", "the frame clock went back %.2f s: the clip starts afresh",
                    kept.seconds, every=False,
                )  # fmt: skip
            elif kept.reason == "slow":
                self._problems.add(
                    "slow", "frames come %.2f s apart, slower than the model's %.3g Hz: no "
                    "clip until they come faster", kept.seconds, self.pace_hz, every=False,
                )  # fmt: skip
            yield index, t, frame, kept.gap

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        frames = self._live(stop) if self.live else self._frames(stop)
        emitted, limit = 0, self.cfg.limit
        meta: dict[str, Any]
        last, passes = -1, 0  # a recorded file that loops: its index starts again
        try:
            for index, t, frame, fresh in self._paced(frames):
                looped = self.cfg.path is not None and index <= last
                last = index
                label, meta = None, {"frame": index}
                if fresh:
                    meta["gap"] = True
                if self.intervals:
                    label, meta["classes"] = frame_labels(self.intervals, t, self.cfg.positive)
                data = self._shape(frame)  # after the queue: no work spent on dropped frames
                sample = Sample(
                    id=f"{self.name}#{index}", data=data, label=label, time=t, meta=meta
                )
                if looped:
                    passes += 1
                    mark_pass(sample, passes)
                yield sample
                emitted += 1
                if limit is not None and emitted >= limit:
                    break
        finally:
            frames.close()
            self._problems.summary()


def _row_of(name: str) -> str:
    m = re.search(r"-(\d+)$", name)
    if not m:
        raise SourceError(f"{name}: cannot tell its labels row; set labels_row")
    return f"{m.group(1)}.mp4"


def _safe_url(url: str | None) -> str:
    """A URL without credentials, as a name for logs and sample ids."""
    return re.sub(r"//[^@/]*@", "//", url or "stream")
