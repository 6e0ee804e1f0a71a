"""ECG records as windows: fixed windows with a hop, or one window centred on each R peak.

Reads an npz record (``signal``, ``fs``, ``r_peaks``, ``pvc_peaks``, as in the MIT-BIH subset)
or a native WFDB record (``.hea`` + signal files, beat annotations from ``.atr`` when present).
Windows are (length, C) float32 in the record's physical units (mV). With annotations, a beat
window is labelled as a PVC when its beat is one, a fixed window when it holds a PVC's R peak;
every other window as a non-PVC. The label is a class *name* mapped to its index in the bundle's
labels (``classes``: PVC ``V``, other ``N`` by default, :func:`beat_labels`), so a PVC is ``V``
whatever its output index; a name the classes lack is refused in one line. Without ``classes``
the label is 1 for a PVC and 0 otherwise (a binary model's own order).
"""

from __future__ import annotations

import logging
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from edge_agent.errors import SourceError
from edge_agent.sources.base import Problems, Sample, SourceSettings, mark_pass, pace
from edge_agent.sources.wfdb_io import BEAT_CODES, PVC, read_annotations, read_record
from edge_agent.window import Setting, beat_starts

if TYPE_CHECKING:
    from edge_agent.bundle import WindowSpec

__all__ = ["EcgRecord", "EcgSettings", "EcgSource", "beat_labels", "ecg_window", "load_ecg"]

log = logging.getLogger("medge.agent.source.ecg")


class EcgSettings(SourceSettings):
    kind: Literal["ecg"] = Field(default="ecg", description="Source plug-in: ECG record.")
    path: Path = Field(description="An npz record, or a WFDB header (.hea) with its files.")
    leads: list[int | str] | None = Field(
        default=None, description="WFDB leads by number or name ('MLII'); default: the first."
    )
    annotator: str = Field(
        default="atr", description="WFDB annotation file extension for beats ('atr')."
    )
    mode: Literal["fixed", "beats"] = Field(
        default="beats", description="fixed: windows every hop; beats: centred on each R peak."
    )
    length: int = Field(default=260, ge=2, description="Window length in samples.")
    before: int | None = Field(
        default=None,
        ge=0,
        description="Beat mode: samples before the R peak (e.g. 90 for R-90..R+170 windows); "
        "default: length // 2, centred.",
    )
    hop: int | None = Field(default=None, ge=1, description="Fixed mode hop; default: length.")
    realtime: bool = Field(
        default=False, description="Emit each window when the recording reaches its end."
    )
    loop: bool = Field(default=False, description="Start again at the end of the record.")
    limit: int | None = Field(default=None, ge=1, description="Stop after this many windows.")
    classes: list[str] | None = Field(
        default=None,
        description="The bundle's class names in output order; labels are their indexes by name "
        "(pvc_class, other_class). Default: 1 for a PVC, 0 otherwise.",
    )
    pvc_class: str = Field(default="V", description="The class name of a PVC beat (AAMI 'V').")
    other_class: str = Field(
        default="N", description="The class name of every other beat or window (AAMI 'N')."
    )


def beat_labels(classes: Sequence[str], pvc: str = "V", other: str = "N") -> tuple[int, int]:
    """(index of a non-PVC, index of a PVC) among ``classes``, by name; SourceError in one line
    when either name is missing (e.g. a bundle labelled ``N, S, V, F, Q``: (0, 2))."""
    names = list(classes)
    for what, name in (("PVC", pvc), ("non-PVC", other)):
        if name not in names:
            raise SourceError(
                f"the bundle's labels ({', '.join(names)}) have no '{name}' for a {what} beat; "
                f"set the ecg source's {'pvc_class' if what == 'PVC' else 'other_class'}"
            )
    return names.index(other), names.index(pvc)


def ecg_window(cfg: EcgSettings, spec: WindowSpec | None) -> tuple[EcgSettings, list[Setting]]:
    """The ECG settings with the bundle's window for whatever the config leaves unset (a field
    is the config's only when its YAML names it), and each window setting that matters in the
    resulting mode (beats: length, mode, before; fixed: length, mode, hop) with its origin."""
    given = cfg.model_fields_set
    bundle: dict[str, Any] = {}
    if spec is not None:
        bundle = {
            "length": spec.length,
            "mode": "beats" if spec.centre == "beat" else "fixed",
            "hop": spec.hop,
            # a bundle without 'before' was evaluated on centred beats (converter.stream_eval)
            "before": spec.before if spec.before is not None else spec.length // 2,
        }
    update = {k: v for k, v in bundle.items() if k not in given}
    if "before" in update and spec is not None and spec.before is None:
        del update["before"]  # centred: left to the source's length // 2, as the bundle says
    out = cfg.model_copy(update=update)
    names = ("length", "mode", "before") if out.mode == "beats" else ("length", "mode", "hop")
    settings = []
    for k in names:
        value = getattr(out, k)
        if k == "before" and value is None:
            value = out.length // 2
        if k == "hop" and value is None:
            value = out.length
        origin = "config" if k in given else "bundle" if k in bundle else "default"
        settings.append(Setting(k, value, origin, bundle.get(k)))  # type: ignore[arg-type]
    return out, settings


class EcgRecord:
    """A whole record in memory: signal (N, C) float32, fs, and beats when annotated."""

    def __init__(
        self,
        name: str,
        signal: np.ndarray,
        fs: float,
        r_peaks: np.ndarray | None,
        pvc: np.ndarray | None,
        problems: list[str] | None = None,
    ) -> None:
        self.name, self.signal, self.fs = name, signal, fs
        self.r_peaks, self.pvc = r_peaks, pvc
        self.problems = problems or []


def load_ecg(path: Path, leads: list[int | str] | None = None, annotator: str = "atr") -> EcgRecord:
    """Read an npz or WFDB record (see the module docstring)."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as d:
                if "signal" not in d.files or "fs" not in d.files:
                    raise SourceError(f"{path}: an ECG npz needs 'signal' and 'fs'")
                sig = np.asarray(d["signal"], np.float32)
                sig = sig[:, None] if sig.ndim == 1 else sig
                if leads:
                    idx = [x for x in leads if isinstance(x, int)]
                    if len(idx) != len(leads) or max(idx) >= sig.shape[1]:
                        raise SourceError(f"{path}: leads {leads} not in {sig.shape[1]} column(s)")
                    sig = sig[:, idx]
                r = np.asarray(d["r_peaks"], np.int64) if "r_peaks" in d.files else None
                v = np.asarray(d["pvc_peaks"], np.int64) if "pvc_peaks" in d.files else None
                return EcgRecord(path.stem, sig, float(d["fs"]), r, v)
        except FileNotFoundError as exc:
            raise SourceError(f"{path}: no such file") from exc
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise SourceError(f"{path}: not a readable npz ({exc})") from exc
    hea = path if path.suffix == ".hea" else path.with_suffix(".hea")
    head, sig, problems = read_record(hea, leads or [0])
    atr = hea.with_suffix(f".{annotator}")
    r = v = None
    if atr.is_file():
        samples, codes = read_annotations(atr)
        beats = np.isin(codes, list(BEAT_CODES))
        r, v = samples[beats], samples[beats & (codes == PVC)]
    return EcgRecord(head.name, sig, head.fs, r, v, problems)


class EcgSource:
    """``classes`` (the bundle's labels, in output order) overrides ``cfg.classes``."""

    def __init__(self, cfg: EcgSettings, classes: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        names = classes if classes is not None else cfg.classes
        # (non-PVC, PVC) label indexes: by class name when the classes are known
        self.label_index = beat_labels(names, cfg.pvc_class, cfg.other_class) if names else (0, 1)
        self.record = load_ecg(cfg.path, cfg.leads, cfg.annotator)
        self.name = f"{self.record.name}:{cfg.mode}"
        self._problems = Problems(self.name, log)
        for p in self.record.problems:
            self._problems.add("record", "%s", p)
        if cfg.mode == "beats" and self.record.r_peaks is None:
            raise SourceError(
                f"{cfg.path}: beat windows need R peaks (r_peaks or .{cfg.annotator})"
            )
        self.edge_beats = 0  # beats too near either end for a whole window

    @property
    def errors(self) -> dict[str, int]:
        return self._problems.snapshot()

    def windows(self) -> Iterator[tuple[int, int | None, int | None]]:
        """(start sample, label, R peak) of each window, in order."""
        rec, n = self.record, self.cfg.length
        half = self.cfg.before if self.cfg.before is not None else n // 2
        total = len(rec.signal)
        pvc = set(rec.pvc.tolist()) if rec.pvc is not None else None
        index = self.label_index
        if self.cfg.mode == "beats" and rec.r_peaks is not None:
            starts = beat_starts(rec.r_peaks.tolist(), total, n, half)
            self.edge_beats = len(rec.r_peaks) - len(starts)
            for start in starts:
                r = start + half
                yield start, (index[r in pvc] if pvc is not None else None), r
            return
        hop = self.cfg.hop or n
        for start in range(0, total - n + 1, hop):
            label = None
            if rec.pvc is not None:
                label = index[bool(((rec.pvc >= start) & (rec.pvc < start + n)).any())]
            yield start, label, None

    def stream(self, stop: threading.Event) -> Iterator[Sample]:
        rec, n, emitted, passes = self.record, self.cfg.length, 0, 0
        try:
            while not stop.is_set():
                t0, first = time.monotonic(), True
                for start, label, r in self.windows():
                    if stop.is_set():
                        return
                    if self.cfg.realtime and not pace(stop, t0, (start + n) / rec.fs):
                        return
                    data = rec.signal[start : start + n]
                    if not np.isfinite(data).all():
                        self._problems.add(
                            "invalid",
                            "window at %d has invalid samples; skipped",
                            start,
                            every=False,
                        )
                        continue
                    meta: dict[str, object] = {"start": start, "fs": rec.fs}
                    if r is not None:
                        meta["r_peak"] = r
                    wid = f"{rec.name}@{r if r is not None else start}"
                    sample = Sample(wid, np.array(data), label, start / rec.fs, meta)
                    yield mark_pass(sample, passes) if passes and first else sample
                    first = False
                    emitted += 1
                    if self.cfg.limit is not None and emitted >= self.cfg.limit:
                        return
                if not self.cfg.loop:
                    return
                passes += 1
        finally:
            self._problems.summary()
