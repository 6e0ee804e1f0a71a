"""The zoo's wrist fall LSTM: its committed data and spec agree (no TensorFlow, no training)."""

from __future__ import annotations

import gzip
import json
import logging
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundle import EventRule, WindowSpec
from edge_agent.events import EventTracker
from models import wrist_fall_lstm as m

IMU = Path(__file__).parent / "data" / "imu"


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    with np.load(m.DATA, allow_pickle=False) as d:
        return {k: d[k] for k in d.files}


def test_splits_shapes_dtypes_and_finite(data: dict[str, np.ndarray]) -> None:
    assert [str(s) for s in data["labels"]] == m.CLASS_NAMES == ["no_fall", "fall"]
    for split in ("calib", "val"):
        x, y = data[f"{split}_images"], data[f"{split}_labels"]
        assert x.dtype == np.float32 and x.shape[1:] == (m.LENGTH, 6) and len(x) == len(y)
        assert np.isfinite(x).all() and set(np.unique(y)) == {0, 1}
    assert m.DATA.stat().st_size < 1.5e6


def test_simulated_and_real_are_marked_apart(data: dict[str, np.ndarray]) -> None:
    sim, y = data["val_simulated"], data["val_labels"]
    assert sim.dtype == bool and len(sim) == len(y)
    # every fall is simulated; every real window is a daily activity
    np.testing.assert_array_equal(sim, y == 1)
    acts = data["val_activity"]
    assert set(acts[sim]) == {"fall"} and set(acts[~sim]) <= set("ABCDEFGHIJKLMOPQRS")
    assert (~sim).sum() == 800 and sim.sum() == 400
    # a simulated fall window holds an impact of at least 3 g; real ones mostly do not
    peak = np.linalg.norm(data["val_images"][..., :3], axis=-1).max(axis=1) / 9.81
    assert (peak[sim] >= 2.9).all()


def test_split_is_disjoint_by_subject(data: dict[str, np.ndarray]) -> None:
    train = set(data["train_subjects"].tolist())
    val = set(data["val_subject"].tolist())
    assert train == set(m.TRAIN_SUBJECTS) and val == set(m.VAL_SUBJECTS)
    assert not train & val


def test_spec_matches_weights_and_bundle_fields() -> None:
    spec = m.SPEC
    assert spec.family == "LSTM" and spec.data_kind == "real + simulated"
    c = spec.convert
    assert c["labels"] == m.CLASS_NAMES and c["positive_label"] == "fall"
    w = WindowSpec(**c["window"])
    assert (w.length, w.hop, w.rate_hz) == (60, 10, 20.0)
    rule = EventRule(**c["events"][0])
    assert rule.name == "fall" and rule.label == "fall" and rule.off <= rule.on
    assert len(c["preprocess"]["mean"]) == len(c["preprocess"]["std"]) == 6
    # the committed .keras: input (1, 60, 6) (a static batch of one) and 2 softmax outputs
    with zipfile.ZipFile(spec.weights) as z:
        cfg = json.loads(z.read("config.json"))
    layers = cfg["config"]["layers"]
    assert layers[0]["config"]["batch_shape"] == [1, m.LENGTH, 6]
    assert layers[-1]["config"]["units"] == len(m.CLASS_NAMES)
    assert layers[-1]["config"]["activation"] == "softmax"
    assert spec.weights.stat().st_size < 1e6


def test_importing_the_model_does_not_import_tensorflow() -> None:
    import subprocess
    import sys

    code = "import sys, models.wrist_fall_lstm; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_training_pairing_gives_the_agents_samples() -> None:
    """The model's training runs are the agent's IMU source's samples: on the committed
    excerpt (with its gap) the same times, values, labels and run starts."""
    from edge_agent.sources import ImuSettings, ImuSource

    acc, gyr = IMU / "1605_accel_DE.txt.gz", IMU / "1605_gyro_DE.txt.gz"
    runs = m.pair_files(acc, gyr)
    out = list(ImuSource(ImuSettings(path=acc, gyro=gyr)).stream(threading.Event()))
    assert len(runs) == 2 and sum(len(r.t) for r in runs) == len(out)
    np.testing.assert_array_equal(np.concatenate([r.v for r in runs]), [s.data for s in out])
    np.testing.assert_array_equal(np.concatenate([r.t for r in runs]), [s.time for s in out])
    assert [a for r in runs for a in r.act] == [s.meta["activity"] for s in out]
    assert [s.meta.get("gap", False) for s in out].index(True) == len(runs[0].t)


def test_real_windows_and_simulated_fall_windows_from_the_excerpt() -> None:
    runs = m.pair_files(IMU / "1605_accel_DE.txt.gz", IMU / "1605_gyro_DE.txt.gz")
    x, acts = m.real_windows(runs)
    assert x.shape[1:] == (m.LENGTH, 6) and len(acts) == len(x)
    assert len(x) == sum((len(r.t) - m.LENGTH) // m.HOP + 1 for r in runs)
    falls = m.fall_windows(runs, 5, np.random.default_rng(0))
    peak = np.linalg.norm(falls[..., :3], axis=-1).max(axis=1) / 9.81
    assert falls.shape == (5, m.LENGTH, 6) and (peak >= 3).all()
    again = m.fall_windows(runs, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(falls, again)


def test_missing_data_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "models.wrist_fall_lstm", "--data-root", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "data_1600_accel_watch.txt.gz" in out.stderr


def _write_wisdm(path: Path, t: np.ndarray, v: np.ndarray, act: str = "E") -> None:
    rows = [f"1605,{act},{round(ti * 1e9)},{x:.6f},{y:.6f},{z:.6f};" for ti, (x, y, z) in
            zip(t, v, strict=True)]  # fmt: skip
    path.write_text("\n".join(rows) + "\n")


def _events(model: Any, src: Any, rules: list[EventRule]) -> tuple[int, list[dict[str, Any]]]:
    tracker = EventTracker(rules, m.CLASS_NAMES)
    out, n = [], 0
    for w in src.stream(threading.Event()):
        assert w.data.shape == (m.LENGTH, 6)
        n += 1
        out += tracker.update(float(w.time or 0), model.infer(model.prepare(w.data)), w.id)
    return n, [e for e in out if e["state"] == "start"]


@pytest.mark.slow  # converts the committed weights (cached by content)
def test_int8_bundle_on_the_agents_imu_source(tmp_path: Path) -> None:
    """The bundle converts within budget (unrolled-int8 wins), and the agent's own path (the
    6-channel IMU source, the manifest's window, LiteRT int8, the fall rule) raises no fall on
    3 real minutes of sitting and standing, and one fall on the same stream with a simulated
    fall written into its files."""
    from conftest import convert_cached

    from edge_agent.bundle import Bundle
    from edge_agent.model import LoadedModel
    from edge_agent.sources import ImuSettings, open_source
    from edge_agent.sources.base import Problems
    from edge_agent.sources.imu import pair_runs, read_track
    from medge.zoo import request as zoo_request
    from models.fall_sim import simulate_fall

    # lean: the LiteRT path is what this test is about
    out = convert_cached(zoo_request(m.SPEC, tmp_path / "wrist-fall-lstm", lean=True))
    report = json.loads((out / "report.json").read_text())
    won = [a["strategy"] for a in report["litert"]["attempts"] if a["outcome"] == "won"]
    assert won == ["unrolled-int8"] and report["budget"]["winner"] == "int8"
    assert report["float"]["auc"] - report["litert-int8"]["auc"] < 0.005
    bundle = Bundle.load(out)
    model = LoadedModel(bundle)
    rules = bundle.manifest.decode.events
    assert [r.name for r in rules] == ["fall"]

    real = open_source(
        ImuSettings(path=IMU / "1605_accel_DE.txt.gz", gyro=IMU / "1605_gyro_DE.txt.gz"),
        bundle.manifest.window,
    )
    n, falls = _events(model, real, rules)
    assert n > 300 and falls == []  # real daily activity: no alarm

    quiet = logging.getLogger("test.quiet")
    tracks = []
    for k in ("accel", "gyro"):
        with gzip.open(IMU / f"1605_{k}_DE.txt.gz", "rt") as f:
            tracks.append(read_track(f, Problems(k, quiet), 20.0, 5.0))
    run = next(pair_runs(*tracks, 20.0))  # the 2 min of sitting, aligned at 20 Hz
    sig, _, _ = simulate_fall(run.v[:600], np.random.default_rng(1), post=run.v[600:1200])
    t = run.t[0] + np.arange(len(sig)) / 20.0
    _write_wisdm(tmp_path / "a.txt", t, sig[:, :3])
    _write_wisdm(tmp_path / "g.txt", t, sig[:, 3:])
    fell_cfg = ImuSettings(path=tmp_path / "a.txt", gyro=tmp_path / "g.txt")
    fell = open_source(fell_cfg, bundle.manifest.window)
    _, falls = _events(model, fell, rules)
    assert len(falls) == 1 and 600 / 20 - 3 <= falls[0]["start"] - t[0] <= 600 / 20 + 4
