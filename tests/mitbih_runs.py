"""PVC runs of a MIT-BIH record as annotated events: the truth the event tests and
bench/event_detection_mitbih.py score detections against (real annotations)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def pvc_runs(peaks: list[int], pvc: set[int], least: int = 2) -> list[list[int]]:
    """Maximal runs of >= least consecutive PVC beats (R peak samples), as annotated."""
    runs: list[list[int]] = []
    cur: list[int] = []
    for r in [*peaks, -1]:
        if r in pvc:
            cur.append(r)
            continue
        if len(cur) >= least:
            runs.append(cur)
        cur = []
    return runs


def annotated_recording(src: Path, out: Path) -> int:
    """A MIT-BIH npz (signal, fs, r_peaks, pvc_peaks) as a recording for `--stream`: each run
    of >= 2 PVCs is one event, from its first PVC's R peak to its last's. Returns the number
    of events."""
    with np.load(src) as d:
        fs, peaks = float(d["fs"]), d["r_peaks"]
        runs = pvc_runs(peaks.tolist(), set(d["pvc_peaks"].tolist()))
        events = np.array([(r[0] / fs, r[-1] / fs) for r in runs]).reshape(-1, 2)
        np.savez(out, signal=d["signal"], rate_hz=fs, r_peaks=peaks, events=events)
    return len(runs)
