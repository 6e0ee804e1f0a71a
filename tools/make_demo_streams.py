"""Write the streams that ``medge demo`` replays for its stream scenarios (medge/demo_scenarios.py):

- wrist: real WISDM 2019 watch activity of subject 1605 (a validation subject of the zoo's
  wrist fall LSTM) with SIMULATED falls written into it (models.fall_sim), as WISDM-format
  accelerometer and gyroscope files (models/data/demo_wrist_{accel,gyro}.txt.gz);
- ecg: the last 5 minutes of the zoo ECG model's 10-minute stream of MIT-BIH record 106
  (models/data/demo_ecg_106.npz: 24:00-29:00 of the record, real, unchanged samples), where
  43 of its 44 PVC runs are, the first 7 s in, so the demo shows one at once.

    .venv/bin/python tools/make_demo_streams.py [--data-root ../shared/data] [--out models/data]
    .venv/bin/python tools/make_demo_streams.py --check-wrist BUNDLE --check-ecg BUNDLE

Wrist plan (:data:`SEGMENTS`): real stretches of one activity each, cut from the subject's paired
20 Hz runs (models.wrist_fall_lstm.pair_files: the agent's IMU rules), and between two of them
a simulated fall: free fall, impact, lying still, getting up (always, so that the next real
stretch follows), drawn with a fixed seed. Both files share one 20 Hz clock (exact 50 ms steps
from the subject's first sample of the first stretch), so the agent's IMU source pairs them
sample for sample. Real samples keep their WISDM activity letter; simulated ones (free fall to
the end of getting up) are marked ``X``. The impact times are printed and written into
models/data/ATTRIBUTION-demo-streams.md by hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import ecg_gru  # noqa: E402
from models import wrist_fall_lstm as wrist  # noqa: E402
from models.fall_sim import sample_params, simulate_fall  # noqa: E402

SUBJECT = 1605
SEED = 7
RATE_HZ = wrist.RATE_HZ
STEP_NS = round(1e9 / RATE_HZ)
SIMULATED = "X"  # the activity letter of simulated samples (WISDM uses A-S without N)
# (activity letter, start s into the subject's run of that activity, seconds); a simulated
# fall between each two: 6 s of walking before the first, then one every ~50 s
SEGMENTS: tuple[tuple[str, float, float], ...] = (
    ("A", 20.0, 6.0),  # walking
    ("E", 10.0, 45.0),  # standing (inside tests/data/imu/1605_*_DE: checked there)
    ("C", 30.0, 45.0),  # stairs
    ("K", 30.0, 45.0),  # drinking from a cup
    ("A", 100.0, 46.0),  # walking
)


ECG_FROM_S = 300.0  # of the 600 s stream: 43 of its 44 PVC runs are after it


def write_ecg(
    out: Path, stream: Path = ecg_gru.STREAM, start_s: float = ECG_FROM_S
) -> dict[str, Any]:
    """The stream recording from ``start_s`` on, in the same format (signal in mV, fs, r_peaks,
    pvc_peaks, events: each run of >= 2 PVCs as (first R, last R) in seconds)."""
    with np.load(stream) as d:
        fs, sig = float(d["fs"]), d["signal"]
        r, v, ev = d["r_peaks"], d["pvc_peaks"], d["events"]
    a = round(start_s * fs)
    keep = ev[:, 0] >= start_s
    np.savez_compressed(
        out,
        signal=sig[a:],
        fs=np.float64(fs),
        r_peaks=r[r >= a] - a,
        pvc_peaks=v[v >= a] - a,
        events=ev[keep] - start_s,
    )
    return {
        "ecg_seconds": round((len(sig) - a) / fs, 3),
        "ecg_runs": int(keep.sum()),
        "ecg_run_starts_s": [round(float(x), 2) for x in ev[keep][:, 0] - start_s],
        "ecg_bytes": out.stat().st_size,
    }


def _runs_by_activity(data_root: Path) -> dict[str, wrist.Run]:
    d = data_root / "wearable" / "wisdm2019_watch"
    accel, gyro = (d / f"data_{SUBJECT}_{k}_watch.txt.gz" for k in ("accel", "gyro"))
    for f in (accel, gyro):
        if not f.is_file():
            raise FileNotFoundError(f"missing data file {f}")
    out: dict[str, wrist.Run] = {}
    for run in wrist.pair_files(accel, gyro):
        act = run.act[0]
        if act not in out or len(run.t) > len(out[act].t):
            out[act] = run
    return out


def make_stream(data_root: Path) -> tuple[np.ndarray, list[str], list[int], float]:
    """(samples (n, 6), activity per sample, impact sample of each fall, first time s)."""
    runs = _runs_by_activity(data_root)
    rng = np.random.default_rng(SEED)
    pieces = []
    for act, start, seconds in SEGMENTS:
        run = runs[act]
        a = int(start * RATE_HZ)
        b = a + int(seconds * RATE_HZ)
        if b > len(run.t):
            raise ValueError(f"activity {act}: {start}+{seconds} s is past its {len(run.t)}")
        pieces.append((run.v[a:b], act))
    t0 = float(runs[SEGMENTS[0][0]].t[int(SEGMENTS[0][1] * RATE_HZ)])
    sig, acts = pieces[0][0], [pieces[0][1]] * len(pieces[0][0])
    impacts = []
    for post, act in pieces[1:]:
        params = dataclasses.replace(sample_params(rng), recover=True)
        out, impact, _ = simulate_fall(sig, rng, post=post, params=params, rate_hz=RATE_HZ)
        fell = len(out) - len(sig) - len(post)  # free fall .. getting up
        acts += [SIMULATED] * fell + [act] * len(post)
        impacts.append(impact)
        sig = out
    assert len(acts) == len(sig)
    return sig, acts, impacts, t0


def write_wisdm(path: Path, t0_ns: int, values: np.ndarray, acts: list[str]) -> None:
    """WISDM watch lines (``subject,activity,timestamp_ns,x,y,z;``), 4 decimals, gzip."""
    rows = [
        f"{SUBJECT},{a},{t0_ns + k * STEP_NS},{x:.4f},{y:.4f},{z:.4f};\n"
        for k, (a, (x, y, z)) in enumerate(zip(acts, values, strict=True))
    ]
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes on every run
        f.write("".join(rows).encode())


def event_starts(
    bundle_dir: Path, settings: Any, event: str
) -> tuple[list[float], int, dict[str, int]]:
    """(start time s of each ``event``, windows, onsets suppressed) that the agent's own path
    raises on a source: the source with the manifest's window and labels, LiteRT, the
    bundle's event rules."""
    import threading

    from edge_agent.bundle import Bundle
    from edge_agent.events import EventTracker
    from edge_agent.model import LoadedModel
    from edge_agent.sources import open_source

    bundle = Bundle.load(bundle_dir)
    man = bundle.manifest
    model = LoadedModel(bundle)
    tracker = EventTracker(man.decode.events, man.labels)
    src = open_source(settings, man.window, man.labels)
    starts, n = [], 0
    for w in src.stream(threading.Event()):
        n += 1
        for e in tracker.update(float(w.time or 0), model.infer(model.prepare(w.data)), w.id):
            if e["state"] == "start" and e["event"] == event:
                starts.append(float(e["start"]))
    return starts, n, tracker.suppressed


def main() -> None:
    ap = argparse.ArgumentParser(description="Write the demo's streams (wrist: real + simulated).")
    ap.add_argument("--data-root", type=Path, default=wrist.DEFAULT_ROOT, help="../shared/data")
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "data")
    ap.add_argument("--check-wrist", type=Path, metavar="BUNDLE", help="falls it raises on them")
    ap.add_argument("--check-ecg", type=Path, metavar="BUNDLE", help="PVC runs it raises")
    args = ap.parse_args()
    accel = args.out / "demo_wrist_accel.txt.gz"
    gyro = args.out / "demo_wrist_gyro.txt.gz"
    ecg = args.out / "demo_ecg_106.npz"
    if args.check_wrist is None and args.check_ecg is None:
        try:
            sig, acts, impacts, t0 = make_stream(args.data_root)
        except FileNotFoundError as exc:
            sys.exit(f"make_demo_streams: {exc}")
        t0_ns = round(t0 * 1e9)
        write_wisdm(accel, t0_ns, sig[:, :3], acts)
        write_wisdm(gyro, t0_ns, sig[:, 3:], acts)
        info = {
            "seconds": round(len(sig) / RATE_HZ, 2),
            "impacts_s": [round(i / RATE_HZ, 2) for i in impacts],
            "simulated_s": round(acts.count(SIMULATED) / RATE_HZ, 2),
            "bytes": accel.stat().st_size + gyro.stat().st_size,
            **write_ecg(ecg),
        }
        print(json.dumps(info))
        return
    from edge_agent.sources import EcgSettings, ImuSettings

    if args.check_wrist is not None:
        imu = ImuSettings(path=accel, gyro=gyro, activities="")
        starts, n, quiet = event_starts(args.check_wrist, imu, "fall")
        with gzip.open(accel, "rt") as f:
            first = int(f.readline().split(",")[2]) / 1e9
        at = [round(x - first, 2) for x in starts]
        print(json.dumps({"windows": n, "fall_starts_s": at, "suppressed": quiet}))
    if args.check_ecg is not None:
        starts, n, quiet = event_starts(args.check_ecg, EcgSettings(path=ecg), "pvc_run")
        at = [round(x, 2) for x in starts]
        print(json.dumps({"beats": n, "pvc_runs": len(at), "starts_s": at, "suppressed": quiet}))


if __name__ == "__main__":
    main()
