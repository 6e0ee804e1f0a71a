"""The dashboard's web app: JSON over the gateway's store, a live event stream, the page.

The dashboard only reads. It opens its own :class:`Store` on the gateway's database (WAL lets
the gateway write meanwhile) and polls it. ``GET /api/stream`` is Server-Sent Events: a
``devices`` event (the whole list) whenever the list changes, and one ``result`` event per new
row, in id order, with the row id as the event id. A browser that reconnects sends
Last-Event-ID, any other client can pass ``?after=ID``; either way no row is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import math
import signal
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.store import Store

__all__ = ["DashboardServer", "create_app", "run_dashboard"]

log = logging.getLogger("medge.gateway.dashboard")

STATIC = Path(__file__).with_name("static")
POLL_S = 0.4  # how often a stream looks at the store
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
BATCH = 500  # rows read per query while a stream catches up
MAX_LIMIT = 1000  # the most rows /api/results returns at once
SHUTDOWN_S = 1.0  # how long stop() lets requests finish before they are cancelled

_STORE = web.AppKey("store", Store)
_STOPPING = web.AppKey("stopping", asyncio.Event)
_INDEX = web.AppKey("index", bytes)


def create_app(db_path: Path, title: str = "medge") -> web.Application:
    """The dashboard as an aiohttp application over the store at ``db_path``."""
    app = web.Application()
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    app[_INDEX] = page.replace("{{title}}", html.escape(title)).encode()
    app[_STOPPING] = asyncio.Event()

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = await asyncio.to_thread(Store, db_path)
        app[_STORE] = store
        yield
        await asyncio.to_thread(store.close)

    async def on_shutdown(app: web.Application) -> None:
        app[_STOPPING].set()  # every open stream returns at once

    app.cleanup_ctx.append(store_ctx)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/", _index)
    app.router.add_get("/api/devices", _devices)
    app.router.add_get("/api/results", _results)
    app.router.add_get("/api/stream", _stream)
    app.router.add_static("/static/", STATIC)
    return app


# -- handlers --------------------------------------------------------------------------------
_NO_STORE = {"Cache-Control": "no-store"}


async def _index(request: web.Request) -> web.Response:
    return web.Response(body=request.app[_INDEX], content_type="text/html", charset="utf-8",
                        headers=_NO_STORE)


async def _devices(request: web.Request) -> web.Response:
    rows = await asyncio.to_thread(request.app[_STORE].devices)
    return _json(rows)


async def _results(request: web.Request) -> web.Response:
    query = request.query
    after = _int_param(query.get("after"), 0, "after")
    limit = min(max(_int_param(query.get("limit"), 100, "limit"), 1), MAX_LIMIT)
    site: str | None = query.get("site") or None
    device: str | None = query.get("device") or None
    if device and "/" in device:  # "site/device", the way the page names a device
        site, device = device.split("/", 1)
    rows = await asyncio.to_thread(request.app[_STORE].results, max(after, 0), limit, site,
                                   device)
    return _json(rows)


async def _stream(request: web.Request) -> web.StreamResponse:
    store, stopping = request.app[_STORE], request.app[_STOPPING]
    cursor = _stream_cursor(request)
    if cursor is None:  # no cursor given: only what arrives from now on
        newest = await asyncio.to_thread(store.results, 0, 1)
        cursor = newest[-1]["id"] if newest else 0
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    last_devices: str | None = None
    last_write = loop.time()
    try:
        await response.write(b"retry: 2000\n\n")
        while not stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the client went away
            chunks: list[bytes] = []
            devices = _dumps(await asyncio.to_thread(store.devices))
            if devices != last_devices:
                chunks.append(_event("devices", devices))
                last_devices = devices
            while True:  # catch up batch by batch, each written as soon as it is read
                rows = await asyncio.to_thread(_rows_after, store, cursor, BATCH)
                chunks += [_event("result", _dumps(row), row["id"]) for row in rows]
                cursor = rows[-1]["id"] if rows else cursor
                if not chunks and loop.time() - last_write >= KEEPALIVE_S:
                    chunks.append(b": keepalive\n\n")
                if chunks:
                    await response.write(b"".join(chunks))
                    chunks, last_write = [], loop.time()
                if len(rows) < BATCH:
                    break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), POLL_S)
    except (ConnectionError, RuntimeError) as exc:  # written to a closed connection
        log.debug("stream ended: %s", exc)
    return response


# -- helpers ---------------------------------------------------------------------------------
def _rows_after(store: Store, cursor: int, limit: int) -> list[dict[str, Any]]:
    # Store.results(0, ...) means "the newest rows"; ids start at 1, so -1 asks for the
    # oldest rows after nothing, in id order, which is what a stream must send.
    return store.results(cursor if cursor > 0 else -1, limit)


def _stream_cursor(request: web.Request) -> int | None:
    for raw in (request.headers.get("Last-Event-ID"), request.query.get("after")):
        if raw is not None and raw.strip():
            try:
                return max(int(raw), 0)
            except ValueError:
                continue
    return None


def _int_param(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None


def _event(name: str, data: str, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {data}\n\n".encode()


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _dumps(value: Any) -> str:
    """JSON a browser can parse: NaN and infinities (possible in telemetry) become null."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), separators=(",", ":"), allow_nan=False)


def _json(value: Any) -> web.Response:
    # X-Server-Time lets the page say "3 s ago" right even when its clock is off.
    headers = {**_NO_STORE, "X-Server-Time": f"{time.time():.3f}"}
    return web.Response(text=_dumps(value), content_type="application/json", headers=headers)


async def _start(db_path: Path, host: str, port: int, title: str) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(Path(db_path), title), shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    if ":" in shown:
        shown = f"[{shown}]"
    return runner, f"http://{shown}:{bound_port}/"


# -- running it ------------------------------------------------------------------------------
class DashboardServer:
    """The dashboard served from a background thread with its own event loop.

    ``with DashboardServer(db) as dash: open(dash.url)``; ``port=0`` picks a free port.
    """

    def __init__(self, db_path: Path, host: str = "127.0.0.1", port: int = 0,
                 title: str = "medge") -> None:
        self.db_path, self.host, self.port, self.title = Path(db_path), host, port, title
        self.url = ""  # set by start(), with the port actually bound
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> DashboardServer:
        """Serve; returns once the server accepts connections (raises if it cannot bind)."""
        if self._thread is not None:
            raise RuntimeError("dashboard already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="medge-dashboard", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        log.info("dashboard on %s (database %s)", self.url, self.db_path)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                self._runner, self.url = loop.run_until_complete(
                    _start(self.db_path, self.host, self.port, self.title))
                self.port = int(self.url.rsplit(":", 1)[1].rstrip("/"))
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Close open streams and the server, and join the thread (about a second at most)."""
        thread, loop, runner = self._thread, self._loop, self._runner
        if thread is None or loop is None:
            return
        if runner is not None and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(SHUTDOWN_S + 3)
            except Exception:  # a stop must not raise; say what went wrong
                log.warning("dashboard did not shut down cleanly", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if thread.is_alive():
            log.warning("dashboard thread still running after stop()")
        self._thread, self._loop, self._runner = None, None, None
        log.info("dashboard stopped")


def run_dashboard(db_path: Path, host: str, port: int, title: str = "medge") -> None:
    """Serve the dashboard until SIGINT (Ctrl-C) or SIGTERM."""

    async def main() -> None:
        runner, url = await _start(Path(db_path), host, port, title)
        log.info("dashboard on %s (database %s)", url, db_path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        try:
            await stop.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await runner.cleanup()
            log.info("dashboard stopped")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
