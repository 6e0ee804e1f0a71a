"""`medge demo`'s scenarios: each source is a valid agent source on its shipped data, the wrist
stream holds real activity and the documented simulated falls, and the wrist scenario's whole
chain stores fall events and raises the gateway's fall alert."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from edge_agent import AgentConfig
from edge_agent.bundle import Bundle, WindowSpec
from edge_agent.sources import open_source
from medge.demo_scenarios import SCENARIOS, scenario
from models import ecg_gru, wrist_fall_lstm

DATA = Path(wrist_fall_lstm.__file__).parent / "data"
ACCEL, GYRO = DATA / "demo_wrist_accel.txt.gz", DATA / "demo_wrist_gyro.txt.gz"
IMU = Path(__file__).parent / "data" / "imu"
IMPACTS_S = [6.45, 56.30, 108.55, 159.40]  # models/data/ATTRIBUTION-demo-streams.md


@pytest.mark.parametrize("name", [s.name for s in SCENARIOS])
def test_every_scenario_source_is_an_agent_source_on_its_data(name: str, tmp_path: Path) -> None:
    """The source section validates as an AgentConfig's, and opens with the zoo model's window
    and labels (rate checked against the model's): its first input fits the model."""
    import models

    s = scenario(name)
    spec = models.spec(s.model)
    cfg = AgentConfig.model_validate(
        {
            "site": "demo-ward",
            "device": f"{s.prefix}-01",
            "bundle": tmp_path,
            "identity": tmp_path,
            "source": s.source(4.0, None),
        }
    )
    dumped = cfg.source.model_dump()
    assert dumped["loop"] is True
    if s.realtime:  # streams: the recording's own pace; --rate does not apply
        assert dumped["realtime"] is True and "--rate does not apply" in s.summary
        assert s.source(4.0, None) == s.source(40.0, None)
    else:
        assert dumped["rate_hz"] == 4.0
    window = spec.convert.get("window")
    fast = cfg.source.model_copy(update={"realtime": False}) if s.realtime else cfg.source
    src = open_source(fast, WindowSpec(**window) if window else None, spec.convert.get("labels"))
    first = next(iter(src.stream(threading.Event())))
    assert np.isfinite(first.data).all()
    if window:
        assert first.data.shape[0] == window["length"]


def test_demo_help_lists_the_scenarios_and_what_rate_is_for() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "medge", "demo", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    for s in SCENARIOS:
        assert f"{s.name}: " in r.stdout
    assert "{" + ",".join(s.name for s in SCENARIOS) + "}" in r.stdout
    streams = ", ".join(s.name for s in SCENARIOS if s.realtime)
    assert f"the stream scenarios ({streams}) play in real time" in r.stdout


def _lines(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt") as f:
        return [line.strip().rstrip(";").split(",") for line in f]


def test_wrist_stream_is_real_activity_with_the_documented_simulated_falls() -> None:
    a, g = _lines(ACCEL), _lines(GYRO)
    assert len(a) == len(g) == 4193 and ACCEL.stat().st_size + GYRO.stat().st_size < 200_000
    # one exact 20 Hz clock in both files, the same activity letters
    t = np.array([int(x[2]) for x in a])
    assert (np.diff(t) == 50_000_000).all() and [x[2] for x in g] == [x[2] for x in a]
    acts = [x[1] for x in a]
    assert acts == [x[1] for x in g]
    runs = [(k, len(list(grp))) for k, grp in itertools.groupby(acts)]
    assert [k for k, _ in runs] == list("AXEXCXKXA")  # simulated stretches are marked X
    acc = np.array([[float(v) for v in x[3:]] for x in a])
    peak_g = np.linalg.norm(acc, axis=1) / 9.81
    starts = np.cumsum([0] + [n for _, n in runs])
    for (k, _), lo, hi in zip(runs, starts[:-1], starts[1:], strict=True):
        if k == "X":  # one simulated impact of >= 3 g at a documented time
            assert np.argmax(peak_g[lo:hi]) + lo in [round(s * 20) for s in IMPACTS_S]
            assert peak_g[lo:hi].max() >= 3
        else:  # real daily activity: no such impact
            assert peak_g[lo:hi].max() < 3
    # the standing stretch is subject 1605's real standing, as the committed excerpt holds it
    standing = wrist_fall_lstm.pair_files(IMU / "1605_accel_DE.txt.gz", IMU / "1605_gyro_DE.txt.gz")
    real = standing[1].v[200:1100]  # 10-55 s into standing
    lo = starts[2]
    gyr = np.array([[float(v) for v in x[3:]] for x in g])
    np.testing.assert_allclose(acc[lo : lo + 900], real[:, :3], atol=6e-5)
    np.testing.assert_allclose(gyr[lo : lo + 900], real[:, 3:], atol=6e-5)


def test_ecg_stream_is_the_end_of_the_zoo_s_record_106_stream() -> None:
    with np.load(DATA / "demo_ecg_106.npz") as d, np.load(ecg_gru.STREAM) as full:
        a = 300 * 360
        np.testing.assert_array_equal(d["signal"], full["signal"][a:])
        assert float(d["fs"]) == 360.0
        r, v = full["r_peaks"], full["pvc_peaks"]
        np.testing.assert_array_equal(d["r_peaks"], r[r >= a] - a)
        np.testing.assert_array_equal(d["pvc_peaks"], v[v >= a] - a)
        assert len(d["events"]) == 43 and 6 < d["events"][0, 0] < 7


# -- the zoo bundle, converted once per session into a throwaway medge cache (conftest) -------


# zoo_cache and wrist_bundle: tests/conftest.py (shared with the dashboard's demo test)


@pytest.mark.slow  # converts the zoo model (once per session)
def test_the_zoo_bundle_raises_one_fall_per_simulated_fall_and_none_elsewhere(
    wrist_bundle: Bundle,
) -> None:
    """The agent's own path (the scenario's source with the manifest's window, LiteRT int8, the
    bundle's fall rule) on the whole stream, as fast as it reads."""
    from edge_agent.events import EventTracker
    from edge_agent.model import LoadedModel

    man = wrist_bundle.manifest
    source = {**scenario("wrist").source(4.0, None), "realtime": False, "loop": False}
    cfg = AgentConfig.model_validate(
        {"site": "s", "device": "d", "bundle": ".", "identity": ".", "source": source}
    )
    model = LoadedModel(wrist_bundle)
    tracker = EventTracker(man.decode.events, man.labels)
    starts, n = [], 0
    for w in open_source(cfg.source, man.window, man.labels).stream(threading.Event()):
        n += 1
        assert w.label is None  # the files' letters are no classes of the model
        for e in tracker.update(float(w.time or 0), model.infer(model.prepare(w.data)), w.id):
            if e["state"] == "start":
                starts.append(float(e["start"]))
    assert n == (4193 - 60) // 10 + 1
    t0 = int(_lines(ACCEL)[0][2]) / 1e9
    at = [s - t0 for s in starts]
    assert len(at) == len(IMPACTS_S)  # one per simulated fall, none in the real stretches
    for start, impact in zip(at, IMPACTS_S, strict=True):
        assert impact - 3.0 <= start <= impact  # the first window that holds the impact


@pytest.mark.slow  # starts the whole chain: 11 s of the stream in real time, a fall at 7.5 s
def test_demo_wrist_stores_fall_events_and_raises_the_fall_alert(
    wrist_bundle: Bundle, zoo_cache: Path, tmp_path: Path
) -> None:
    args = ["--scenario", "wrist", "--duration", "11", "--port", "0", "--workdir", str(tmp_path)]
    r = subprocess.run(
        [sys.executable, "-m", "medge", "demo", *args, "--json", "--log-level", "warning"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "MEDGE_CACHE_DIR": str(zoo_cache)},  # where the bundle is
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"bundle {wrist_bundle.id}" in r.stdout  # the session's bundle, from the cache
    summary = json.loads(r.stdout[r.stdout.index("{") :])
    assert summary["ok"] is True
    [dev] = summary["devices"]
    assert dev["device"] == "wr-01" and dev["stored"] == dev["sent"] >= 10
    assert dev["pending"] == 0 and dev["duplicates"] == 0
    [store] = tmp_path.glob("run-*/gateway.sqlite")
    with closing(sqlite3.connect(store)) as db:
        kinds = dict(
            db.execute("SELECT kind, count(*) FROM results WHERE device='wr-01' GROUP BY kind")
        )
        events = [
            json.loads(b) for (b,) in db.execute("SELECT body FROM results WHERE kind='event'")
        ]
        alerts = db.execute("SELECT device, rule, severity, count FROM alerts").fetchall()
    assert kinds["result"] >= 10
    assert [(e["event"], e["state"]) for e in events][:1] == [("fall", "start")]
    assert alerts == [("wr-01", "event:fall", "critical", 1)]
