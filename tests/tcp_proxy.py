"""A TCP proxy between devices and the broker that a test can cut: ``blackhole()`` stops
forwarding in both directions while every socket stays open (a link that silently drops
everything, as a dead Wi-Fi does), ``blackhole(down_only=True)`` forwards what the client
sends but throws away every byte coming back (the client's messages arrive, their
acknowledgements never do), ``cut()`` closes every connection, ``restore()`` forwards again.
New connections are accepted in every mode; in a blackhole they carry nothing. A connection
that lost bytes one way is no MQTT stream any more: ``cut()`` it before ``restore()``."""

from __future__ import annotations

import contextlib
import select
import socket
import threading

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._forward = threading.Event()
        self._forward.set()
        self._down_only = False
        self.discarded = 0  # bytes thrown away by a one-way blackhole
        self._stop = threading.Event()
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def blackhole(self, down_only: bool = False) -> None:
        """Nothing through; ``down_only``: only what comes back from the target is lost."""
        self._down_only = down_only
        if down_only:
            self._forward.set()
        else:
            self._forward.clear()

    def restore(self) -> None:
        self._down_only = False
        self._forward.set()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.accepted += 1
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self._stop.is_set():
                if not self._forward.is_set():  # blackhole: read nothing, send nothing
                    self._forward.wait(0.05)
                    if a.fileno() < 0 or b.fileno() < 0:
                        return
                    continue
                ready, _, _ = select.select([a, b], [], [], 0.05)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is b and self._down_only:
                        with self._lock:
                            self.discarded += len(data)
                        continue
                    peers[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
