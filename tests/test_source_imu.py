"""IMU replay and the live UDP sensor, on real WISDM 2019 smartwatch recordings."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.sources import ImuSettings, ImuSource, UdpSettings, UdpSource, open_source
from edge_agent.sources.imu import parse_wisdm_line

DATA = Path(__file__).parent / "data" / "imu"
AB = DATA / "1600_accel_AB.txt.gz"  # 200 rows walking (A) then 200 jogging (B); clock -400 s
DE = DATA / "1601_gyro_DE.txt"  # 100 rows sitting (D) then 100 standing (E); clock +35.8 s


def _rows(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return f.read().splitlines()


def test_gzip_replay_labels_values_and_the_clock_going_back() -> None:
    src = ImuSource(ImuSettings(path=AB))
    out = list(src.stream(threading.Event()))
    assert len(out) == 400 and out[0].data.shape == (3,) and out[0].data.dtype == np.float32
    assert [s.label for s in out] == [0] * 200 + [1] * 200
    assert src.errors == {"backwards": 1}
    assert [s.id for s in out if s.meta.get("gap")] == ["1600_accel_AB#201"]
    first = _rows(AB)[0].rstrip(";").split(",")  # row, subject, activity, ns, x, y, z
    assert first[:4] == ["3405.0", "1600", "A", "90596623225981"]
    np.testing.assert_array_equal(out[0].data, np.array([float(v) for v in first[4:]], "f4"))
    assert out[0].time == pytest.approx(90596.623225981)


def test_plain_six_column_file_and_a_forward_gap() -> None:
    src = ImuSource(ImuSettings(path=DE))
    out = list(src.stream(threading.Event()))
    assert len(out) == 200 and {s.label for s in out} == {3, 4}  # D sitting, E standing
    assert src.errors == {"gap": 1}
    gap_at = [i for i, s in enumerate(out) if s.meta.get("gap")]
    assert gap_at == [100] and out[100].meta["activity"] == "E"
    assert out[100].time - out[99].time == pytest.approx(35.80, abs=0.01)


def test_nan_inf_and_malformed_lines_are_dropped_counted_and_told_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = _rows(DE)
    f = rows[10].rstrip(";").split(",")
    rows[10] = ",".join([*f[:3], "NaN", *f[4:]]) + ";"
    rows[20] = rows[20].replace(rows[20].split(",")[5], "inf")
    rows[30] = "1601,D,garbage"
    rows[40] = rows[40].replace(",D,", ",D,12x", 1)  # a timestamp that is no number
    path = tmp_path / "damaged.txt"
    path.write_text("\n".join(rows) + "\n")
    src = ImuSource(ImuSettings(path=path))
    with caplog.at_level("WARNING", "medge.agent.source.imu"):
        out = list(src.stream(threading.Event()))
    assert len(out) == 196
    assert src.errors == {"nan": 2, "malformed": 2, "gap": 1}
    assert all(np.isfinite(s.data).all() for s in out)
    said = [r.getMessage() for r in caplog.records]
    assert sum("non-finite" in m for m in said) == 1  # first one told, then counted
    assert "nan=2" in said[-1] and "malformed=2" in said[-1]  # the summary line


def test_windows_never_span_the_gap() -> None:
    src = open_source(ImuSettings(path=AB, window={"length": 64, "hop": 32}))
    out = list(src.stream(threading.Event()))
    assert len(out) == 10 and out[0].data.shape == (64, 3)  # 5 before the jump, 5 after
    assert [w.label for w in out] == [0] * 5 + [1] * 5
    assert out[5].meta["first"] == "1600_accel_AB#201"
    assert src.errors == {"backwards": 1}


def test_realtime_replay_follows_timestamps_and_skips_the_gap(tmp_path: Path) -> None:
    path = tmp_path / "de_middle.txt"
    path.write_text("\n".join(_rows(DE)[95:106]) + "\n")  # 5 D rows, the 35.8 s gap, 6 E rows
    t0 = time.monotonic()
    out = list(ImuSource(ImuSettings(path=path, realtime=True)).stream(threading.Event()))
    took = time.monotonic() - t0
    assert len(out) == 11
    assert 9 * 0.0499 - 0.02 <= took < 2.0  # nine 50 ms steps, not 36 s


def test_parse_wisdm_line() -> None:
    act, ts, v = parse_wisdm_line("1601,D,1891540946438054,0.011,-0.008,8.9881686E-4;\n")
    assert (act, ts) == ("D", 1891540946438054) and v[2] == pytest.approx(8.9881686e-4)
    with pytest.raises(ValueError, match="fields"):
        parse_wisdm_line("1,2,3;")


def _send(port: int, payloads: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for p in payloads:
            s.sendto(p, ("127.0.0.1", port))
            time.sleep(0.0005)


def test_udp_json_datagrams_from_a_real_recording() -> None:
    rows = [r.rstrip(";").split(",") for r in _rows(DE)]
    payloads = []
    for i, f in enumerate(rows):
        if i in (30, 31, 77):  # three datagrams never sent: lost
            continue
        obj: dict[str, object] = {"seq": i, "t": int(f[2]) / 1e9, "label": "DE".index(f[1])}
        obj.update(zip(("x", "y", "z"), map(float, f[3:6]), strict=True))
        if i == 50:
            obj["y"] = float("nan")
        line = json.dumps(obj)  # NaN goes out as the bare word NaN, which json reads back
        payloads.append(b"{broken" if i == 60 else line.encode())
    with UdpSource(UdpSettings(port=0, rate_hz=20, idle_timeout_s=0.5)) as src:
        assert src.address is not None
        threading.Thread(target=_send, args=(src.address[1], payloads), daemon=True).start()
        out = list(src.stream(threading.Event()))
    assert len(out) == 200 - 3 - 2
    assert src.errors == {"lost": 3 + 1, "nan": 1, "malformed": 1, "gap": 1}  # 60 is lost too
    assert [s.label for s in out].count(0) == 100 - 3 - 2  # rows 30, 31, 77 lost; 50, 60 bad
    assert [s.meta["seq"] for s in out if s.meta.get("gap")] == [100]
    np.testing.assert_allclose(out[0].data, [float(v) for v in rows[0][3:6]], rtol=1e-6)


def test_udp_csv_lines_many_per_datagram_and_windowed() -> None:
    rows = [r.rstrip(";").split(",") for r in _rows(DE)][:100]
    lines = [f"{int(f[2]) / 1e9:.6f},{f[3]},{f[4]},{f[5]}" for f in rows]
    payloads = ["\n".join(lines[i : i + 10]).encode() for i in range(0, 100, 10)]
    payloads.insert(3, b"1.0,2.0\n")  # two values for three fields
    cfg = UdpSettings(
        port=0, format="csv", csv_time=True, idle_timeout_s=0.5, window={"length": 20, "hop": 10}
    )
    src = open_source(cfg)
    assert isinstance(src.inner, UdpSource)  # type: ignore[attr-defined]
    port = src.inner.open()[1]  # type: ignore[attr-defined]
    threading.Thread(target=_send, args=(port, payloads), daemon=True).start()
    out = list(src.stream(threading.Event()))
    assert len(out) == 9 and out[0].data.shape == (20, 3)
    assert src.errors == {"malformed": 1}
    np.testing.assert_allclose(out[-1].data[-1], [float(v) for v in rows[99][3:6]], rtol=1e-6)


# accelerometer + gyroscope together: subject 1605 (a validation subject of the zoo's wrist fall
# LSTM), 2401 rows sitting (D) then a 66.7 s gap in both files, then 1200 rows standing (E)
ACC = DATA / "1605_accel_DE.txt.gz"
GYR = DATA / "1605_gyro_DE.txt.gz"


def _paired(acc: Path = ACC, gyr: Path = GYR, **kw: object) -> tuple[ImuSource, list]:
    src = ImuSource(ImuSettings(path=acc, gyro=gyr, **kw))  # type: ignore[arg-type]
    return src, list(src.stream(threading.Event()))


def _track(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [parse_wisdm_line(r) for r in _rows(path)]
    return np.array([r[1] / 1e9 for r in rows]), np.stack([r[2] for r in rows])


def test_accel_and_gyro_aligned_on_one_clock_in_six_channels() -> None:
    src, out = _paired()
    assert out[0].data.shape == (6,) and out[0].data.dtype == np.float32
    t = np.array([s.time for s in out])
    gap_at = [i for i, s in enumerate(out) if s.meta.get("gap")]
    assert len(gap_at) == 1 and out[gap_at[0]].meta["activity"] == "E"
    before, after = np.diff(t[: gap_at[0]]), np.diff(t[gap_at[0] :])
    np.testing.assert_allclose(np.concatenate([before, after]), 0.05, atol=1e-6)  # 20 Hz
    assert t[gap_at[0]] - t[gap_at[0] - 1] == pytest.approx(66.7, abs=0.1)
    ta, _va = _track(ACC)
    tg, _vg = _track(GYR)
    assert out[0].time == pytest.approx(max(ta[0], tg[0]))  # the clock starts in the overlap
    assert {s.label for s in out} == {3, 4}
    assert src.errors == {"gap": 1, "gyro_gap": 1, "unpaired": 1}  # each stream's own gap


def test_resampling_is_linear_interpolation_of_each_stream() -> None:
    _, out = _paired(limit=500)
    ta, va = _track(ACC)
    tg, vg = _track(GYR)
    for s in out[::37]:
        expect = [np.interp(s.time, ta, va[:, k]) for k in range(3)]
        expect += [np.interp(s.time, tg, vg[:, k]) for k in range(3)]
        np.testing.assert_allclose(s.data, expect, rtol=1e-5, atol=1e-6)
    # the gyro's own clock is offset from the accelerometer's: values are interpolated, not copied
    assert not np.isin(out[100].data[3:], vg[:, :]).any()


def test_a_gap_in_one_stream_closes_the_window_and_is_counted(tmp_path: Path) -> None:
    rows = _rows(GYR)[:1000]
    del rows[400:420]  # one second missing in the gyroscope only
    (tmp_path / "g.txt").write_text("\n".join(rows) + "\n")
    acc = tmp_path / "a.txt"
    acc.write_text("\n".join(_rows(ACC)[:1000]) + "\n")
    src = open_source(
        ImuSettings(path=acc, gyro=tmp_path / "g.txt", window={"length": 60, "hop": 10})
    )
    wins = list(src.stream(threading.Event()))
    assert src.errors["gyro_gap"] == 1 and "gap" not in src.errors
    assert wins[0].data.shape == (60, 6)
    _, samples = _paired(acc, tmp_path / "g.txt")
    cut = [i for i, s in enumerate(samples) if s.meta.get("gap")]
    assert len(cut) == 1  # the stretch before the gyroscope's hole, and the one after
    runs = (cut[0], len(samples) - cut[0])
    assert len(wins) == sum((n - 60) // 10 + 1 for n in runs)  # no window spans the hole
    assert samples[cut[0]].time - samples[cut[0] - 1].time == pytest.approx(1.05, abs=0.06)


def test_a_nan_sample_is_dropped_counted_and_interpolated_over(tmp_path: Path) -> None:
    rows = _rows(ACC)[:300]
    f = rows[50].rstrip(";").split(",")
    rows[50] = ",".join([*f[:-3], "NaN", *f[-2:]]) + ";"
    acc = tmp_path / "a.txt"
    acc.write_text("\n".join(rows) + "\n")
    src, out = _paired(acc, GYR)
    assert src.errors["nan"] == 1 and "gap" not in src.errors
    assert all(np.isfinite(s.data).all() for s in out)
    assert not any(s.meta.get("gap") for s in out)  # one missing sample is no gap
    np.testing.assert_allclose(np.diff([s.time for s in out]), 0.05, atol=1e-6)


def test_three_channel_mode_unchanged_without_gyro() -> None:
    out = list(ImuSource(ImuSettings(path=ACC, limit=5)).stream(threading.Event()))
    assert out[0].data.shape == (3,) and out[0].id == "1605_accel_DE#1"
    np.testing.assert_array_equal(out[0].data, _track(ACC)[1][0])
    assert ImuSettings(path=ACC).gyro is None


def test_a_missing_gyro_file_is_one_error(tmp_path: Path) -> None:
    from edge_agent.errors import SourceError

    with pytest.raises(SourceError, match="no such file"):
        ImuSource(ImuSettings(path=ACC, gyro=tmp_path / "none.txt"))


def test_a_looped_recording_marks_its_seam_and_no_window_spans_it() -> None:
    """``loop: true`` plays the file again: the first sample of each new pass says so
    (``meta['loop']``) and starts a fresh window, so no window holds the end of one pass and
    the start of the next; the window after the seam carries the mark to the events stage."""
    src = ImuSource(ImuSettings(path=DE, loop=True, limit=600))
    out = list(src.stream(threading.Event()))
    seams = [i for i, s in enumerate(out) if "loop" in s.meta]
    assert seams == [200, 400] and [out[i].meta["loop"] for i in seams] == [1, 2]
    assert all(out[i].meta["gap"] for i in seams)
    windows = list(
        open_source(
            ImuSettings(path=DE, loop=True, limit=600, window={"length": 50, "hop": 50})
        ).stream(threading.Event())
    )
    firsts = [int(w.meta["first"].rsplit("#", 1)[1]) for w in windows]
    lasts = [int(w.meta["last"].rsplit("#", 1)[1]) for w in windows]
    assert all(a <= b for a, b in zip(firsts, lasts, strict=True))  # within one pass
    assert [w.meta.get("loop") for w in windows].count(1) == 1
