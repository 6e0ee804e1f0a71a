"""Windowing: the array function, the one-at-a-time windower and the stream stage agree."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.sources.base import Sample
from edge_agent.window import Windower, clips, sliding_windows, window_label, windowed


def _signal(t: int = 23, c: int = 3) -> np.ndarray:
    return np.arange(t * c, dtype=np.float32).reshape(t, c)


@pytest.mark.parametrize(("length", "hop"), [(5, 1), (5, 2), (4, 4), (3, 7), (23, 1), (24, 1)])
def test_sliding_windows_cover_what_a_loop_would(length: int, hop: int) -> None:
    x = _signal()
    got = sliding_windows(x, length, hop)
    want = [x[s : s + length] for s in range(0, len(x) - length + 1, hop)]
    assert got.shape == (len(want), length, 3)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_windower_matches_the_array_function_sample_by_sample() -> None:
    x = _signal(40)
    for length, hop in [(8, 3), (8, 8), (4, 10), (1, 1)]:
        win = Windower(length, hop)
        pushed = [w for w in (win.push(row) for row in x) if w is not None]
        np.testing.assert_array_equal(np.stack(pushed), sliding_windows(x, length, hop))


def test_windower_reset_starts_a_fresh_window() -> None:
    win = Windower(4, 2)
    for row in _signal(5):
        win.push(row)
    win.reset()
    assert [win.push(r) is None for r in _signal(4)] == [True, True, True, False]


def test_windower_refuses_a_change_of_shape() -> None:
    win = Windower(3, 1)
    win.push(np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        win.push(np.zeros(4))


def test_window_labels() -> None:
    assert window_label([0, 0, 1, 0], "last") == 0
    assert window_label([0, 0, 1, 0], "max") == 1
    assert window_label([2, 1, 1, 2, 1], "majority") == 1
    assert window_label([3, 2, 2, 3], "majority") == 2  # a tie goes to the smaller
    assert window_label([0, None, 1], "max") is None


def test_windowed_stream_resets_on_a_gap_and_labels_windows() -> None:
    rows = _signal(20)
    samples = [
        Sample(f"s#{i}", rows[i], label=int(i >= 12), time=i * 0.05, meta={"gap": i == 10})
        for i in range(20)
    ]
    out = list(windowed(samples, 4, 2, label="max"))
    # 10 samples before the gap: windows start at 0, 2, 4, 6; after it (10 samples): 10..16
    assert [w.meta["first"] for w in out] == [f"s#{i}" for i in (0, 2, 4, 6, 10, 12, 14, 16)]
    assert [w.label for w in out] == [0, 0, 0, 0, 1, 1, 1, 1]
    np.testing.assert_array_equal(out[4].data, rows[10:14])
    assert out[0].time == 0.0 and out[0].id == "s#0+4"
    assert len(list(windowed(samples, 4, 2, reset_on_gap=False))) == 9


def test_clips_stack_frames() -> None:
    frames = [
        Sample(f"f#{i}", np.full((6, 8, 3), i, np.uint8), label=int(i == 5)) for i in range(9)
    ]
    out = list(clips(frames, 4, 2))
    assert [c.data.shape for c in out] == [(4, 6, 8, 3)] * 3
    assert [int(c.data[0, 0, 0, 0]) for c in out] == [0, 2, 4]
    assert [c.label for c in out] == [0, 1, 1]


def test_manifest_window_cuts_a_real_imu_replay_when_the_config_has_none() -> None:
    """WISDM 2019 gyroscope, sitting then standing with a 35.8 s gap: the bundle's window
    (length 40, hop 20, majority label) applies; no window spans the gap."""
    import threading
    from pathlib import Path

    from edge_agent.bundle import WindowSpec
    from edge_agent.errors import SourceError
    from edge_agent.sources import ImuSettings, NpzReplay, NpzSettings, open_source
    from edge_agent.window import WindowedSource

    de = Path(__file__).parent / "data" / "imu" / "1601_gyro_DE.txt"
    spec = WindowSpec(length=40, hop=20, rate_hz=20, label="majority")
    src = open_source(ImuSettings(path=de, activities="DE"), spec)
    assert isinstance(src, WindowedSource) and src.settings.label == "majority"
    out = list(src.stream(threading.Event()))
    # 100 rows before the gap and 100 after: 1 + (100 - 40) // 20 = 4 windows each side
    assert len(out) == 8 and all(w.data.shape == (40, 3) for w in out)
    assert [w.label for w in out] == [0] * 4 + [1] * 4
    assert src.errors == {"gap": 1}
    # the source's own window wins; a model trained at another rate is refused in one line
    own = open_source(ImuSettings(path=de, window={"length": 10, "hop": 10}), spec)
    assert isinstance(own, WindowedSource) and own.settings.length == 10
    with pytest.raises(
        SourceError,
        match=r"source rate 20 Hz does not match the model's "
        r"window rate_hz 50 Hz",
    ):
        open_source(ImuSettings(path=de), WindowSpec(length=40, hop=20, rate_hz=50))
    npz = Path(__file__).parents[1] / "models" / "data" / "breastmnist_dev.npz"
    assert isinstance(open_source(NpzSettings(path=npz), spec), NpzReplay)  # ready inputs
