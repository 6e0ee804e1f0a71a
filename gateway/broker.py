"""Start an MQTT broker on loopback for the demo and the tests: Mosquitto where it is
installed (MQTT 5), otherwise the embedded pure-Python amqtt broker (MQTT 3.1.1 only)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from edge_agent.errors import MedgeError

__all__ = [
    "RunningBroker",
    "free_port",
    "mosquitto_path",
    "start_broker",
    "start_mosquitto_conf",
]

log = logging.getLogger("medge.broker")

BrokerKind = Literal["auto", "mosquitto", "embedded"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_listening(host: str, port: int, timeout: float, alive: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class RunningBroker:
    """A broker this process started; ``stop()`` ends it."""

    def __init__(self, kind: str, host: str, port: int, protocol: str) -> None:
        self.kind, self.host, self.port, self.protocol = kind, host, port, protocol
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def __enter__(self) -> RunningBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self) -> None:
        """SIGKILL the Mosquitto process (to test what survives a crash)."""
        if self._proc:
            self._proc.kill()
            self._proc.wait()

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._loop and self._stopped and self._thread:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout=10)
            self._loop = None
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def mosquitto_path() -> str | None:
    """The mosquitto executable, also where /usr/sbin is not on PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def start_broker(
    kind: BrokerKind = "auto", host: str = "127.0.0.1", port: int = 0
) -> RunningBroker:
    """Start a broker and return once it accepts connections. ``port`` 0: a free one, and
    another if the one found was taken before the broker bound it (another process asked for
    a free port at the same moment); a port given is tried once."""
    use_mosquitto = kind == "mosquitto" or (kind == "auto" and mosquitto_path() is not None)
    start = _start_mosquitto if use_mosquitto else _start_amqtt
    if port:
        return start(host, port)
    for attempt in range(3):
        try:
            return start(host, free_port(host))
        except MedgeError as exc:
            if attempt == 2:
                raise
            log.warning("%s; trying another free port", exc)
    raise AssertionError("unreachable")


def _start_mosquitto(host: str, port: int) -> RunningBroker:
    workdir = Path(tempfile.mkdtemp(prefix="medge-mosquitto-"))
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {host}\n"
        "allow_anonymous true\n"
        "persistence false\n"
        "max_queued_messages 100000\n"
        "max_inflight_messages 100\n"
        "set_tcp_nodelay true\n"
        f"log_dest file {workdir / 'mosquitto.log'}\n"
        "log_type error\nlog_type warning\n"
    )
    broker = start_mosquitto_conf(conf, host, port)
    broker._workdir = workdir
    return broker


def start_mosquitto_conf(conf: Path, host: str, port: int) -> RunningBroker:
    """Start Mosquitto on a configuration file (e.g. from broker-config) that listens on
    ``host:port``; return once it accepts TCP connections."""
    exe = mosquitto_path()
    if exe is None:
        raise MedgeError("mosquitto is not installed (apt-get install mosquitto)")
    text = conf.read_text()
    if os.geteuid() == 0 and "\nuser " not in text:
        # as root Mosquitto would switch to the 'mosquitto' user, who cannot read our files
        conf.write_text("user root\n" + text)
    proc = subprocess.Popen(
        [exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    broker = RunningBroker("mosquitto", host, port, "5")
    broker._proc = proc
    if not _wait_listening(host, port, 10, lambda: proc.poll() is None):
        assert proc.stderr is not None  # stderr=PIPE
        err = proc.stderr.read().decode(errors="replace").strip() if proc.poll() is not None else ""
        broker.stop()
        raise MedgeError(f"mosquitto did not start on {host}:{port} {err}".strip())
    log.info("mosquitto listening on %s:%d", host, port)
    return broker


def _start_amqtt(host: str, port: int) -> RunningBroker:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise MedgeError("no broker: install mosquitto, or pip install 'medge[gateway]'") from exc
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    broker = RunningBroker("embedded", host, port, "3.1.1")
    ready = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        broker._loop = asyncio.get_running_loop()
        broker._stopped = asyncio.Event()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        server = Broker(config)
        try:
            await server.start()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        ready.set()
        await broker._stopped.wait()
        await server.shutdown()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="amqtt", daemon=True)
    broker._thread = thread
    thread.start()
    # start() returns once the listener is bound: no probe (amqtt logs an ERROR for a
    # connection that sends nothing)
    if not ready.wait(10) or failure or not thread.is_alive():
        broker.stop()
        raise MedgeError(f"embedded broker did not start on {host}:{port}: {failure or ''}")
    log.info("embedded amqtt broker (MQTT 3.1.1) listening on %s:%d", host, port)
    return broker
