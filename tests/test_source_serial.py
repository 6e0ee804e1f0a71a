"""The live serial sensor source on a pseudo-terminal pair (os.openpty): the test writes real
WISDM 2019 smartwatch lines to the master end, the source reads the slave end with pyserial."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import numpy as np
import pytest

from edge_agent.bundle import WindowSpec
from edge_agent.errors import SourceError
from edge_agent.sources import SerialSettings, SerialSource, open_source
from edge_agent.window import WindowedSource

AB = Path(__file__).parent / "data" / "imu" / "1600_accel_AB.txt.gz"  # walking, then jogging


def rows() -> list[list[str]]:
    with gzip.open(AB, "rt") as f:
        return [r.rstrip(";").split(",")[-6:] for r in f.read().splitlines()]


@pytest.fixture
def pty() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)  # a serial line, not a terminal: no echo, no line editing
    name = os.ttyname(slave)
    yield master, name
    os.close(master)
    os.close(slave)


def feed(master: int, lines: list[bytes], src: SerialSource) -> None:
    assert src.opened.wait(10)  # pyserial flushes what came before it opened the port
    for i in range(0, len(lines), 10):
        os.write(master, b"".join(lines[i : i + 10]))
        time.sleep(0.002)


def test_csv_lines_from_a_real_recording(pty: tuple[int, str]) -> None:
    master, port = pty
    r = rows()
    lines = [f"{int(f[2]) / 1e9:.6f},{f[3]},{f[4]},{f[5]}\n".encode() for f in r]
    lines[10] = b"1.0,2.0\n"  # two values for three fields
    lines[20] = lines[20].replace(b",", b",nan,", 1).rsplit(b",", 1)[0] + b"\n"  # x = NaN
    cfg = SerialSettings(port=port, rate_hz=20, idle_timeout_s=1.0)
    src = SerialSource(cfg)
    threading.Thread(target=feed, args=(master, lines, src), daemon=True).start()
    out = list(src.stream(threading.Event()))
    assert len(out) == 400 - 2
    # the recording's clock goes back 400 s where walking turns to jogging
    assert src.errors == {"malformed": 1, "nan": 1, "backwards": 1}
    assert sum(1 for s in out if s.meta.get("gap")) == 1
    np.testing.assert_allclose(out[0].data, [float(v) for v in r[0][3:6]], rtol=1e-6)
    assert out[0].time == pytest.approx(int(r[0][2]) / 1e9, abs=1e-6)


def test_json_lines_windowed_as_the_manifest_says(pty: tuple[int, str]) -> None:
    master, port = pty
    r = rows()[:200]  # walking
    lines = [
        (f'{{"seq": {i}, "t": {int(f[2]) / 1e9}, "values": [{f[3]}, {f[4]}, {f[5]}]}}\n').encode()
        for i, f in enumerate(r)
        if i != 99  # one line lost on the wire
    ]
    cfg = SerialSettings(port=port, format="json", rate_hz=20, idle_timeout_s=1.0)
    src = open_source(cfg, WindowSpec(length=50, hop=25, rate_hz=20))
    assert isinstance(src, WindowedSource) and isinstance(src.inner, SerialSource)
    threading.Thread(target=feed, args=(master, lines, src.inner), daemon=True).start()
    out = list(src.stream(threading.Event()))
    assert src.errors == {"lost": 1}
    assert len(out) == 1 + (199 - 50) // 25 and out[0].data.shape == (50, 3)


def test_a_port_that_is_not_there_is_one_clear_line() -> None:
    src = SerialSource(SerialSettings(port="/dev/medge-no-such-tty"))
    with pytest.raises(SourceError, match=r"serial:/dev/medge-no-such-tty: cannot open"):
        next(iter(src.stream(threading.Event())))


def test_without_pyserial_the_error_says_what_to_install() -> None:
    code = (
        "import sys, threading; sys.modules['serial'] = None\n"
        "from edge_agent.sources import SerialSettings, open_source\n"
        "from edge_agent.errors import SourceError\n"
        "src = open_source(SerialSettings(port='/dev/ttyUSB0'))\n"
        "try:\n    next(iter(src.stream(threading.Event())))\n"
        "except SourceError as e:\n    print(e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.stdout.strip() == "this source needs pyserial: pip install 'medge[serial]'", r.stderr
