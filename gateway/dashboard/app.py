"""The dashboard's web app: JSON over the gateway's store, a live event stream, the page.

Every page and API needs a signed-in user (:mod:`gateway.dashboard.login`); the only thing the
dashboard writes to the store is the audit log and acknowledgements of alerts. It opens its own
:class:`Store` on the gateway's database (WAL lets the gateway write meanwhile) and polls it
through :mod:`gateway.read_models`.

``GET /api/stream`` is Server-Sent Events: a ``devices`` event (the whole list) and an
``alerts`` event (open alerts first) whenever either changes, and one ``result`` event per new
row, in id order, with the row id as the event id. A browser that reconnects sends
Last-Event-ID, any other client can pass ``?after=ID``; either way no row is missed.

A result whose body carries a CAM thumbnail (``gateway.dashboard.cam``) gets ``cam: {png,
label}`` in its row, checked again here; the page shows it as a data: URL image, which the
Content-Security-Policy sent with every response allows for images and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from edge_agent.errors import MedgeError
from gateway import read_models
from gateway.alerts import AlertError, UnknownAlert, acknowledge, list_alerts
from gateway.dashboard import detail, login, rollouts_view, rules_view
from gateway.dashboard.auth import SESSION_TTL_S, Sessions, Users
from gateway.dashboard.cam import check_cam
from gateway.dashboard.keys import ANONYMOUS, INDEX, SESSIONS, STATIC, STOPPING, STORE, TITLE, USERS
from gateway.dashboard.replies import (
    NO_STORE,
    device_param,
    dumps,
    fault,
    int_param,
    json_reply,
    json_text,
    read_store,
)
from gateway.dashboard.throttle import LoginPolicy
from gateway.store import Store

__all__ = ["create_app"]

log = logging.getLogger("medge.gateway.dashboard")
T = TypeVar("T")

STATIC_DIR = Path(__file__).with_name("static")
POLL_S = 0.4  # how often a stream looks at the store
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
BATCH = 500  # rows read per query while a stream catches up
MAX_LIMIT = 1000  # the most rows /api/results returns at once
ALERTS_SHOWN = 50  # alerts in the panel: open and acknowledged first, then recently resolved
MAX_HISTORY_MIN = 24 * 60  # the longest chart window (the store keeps 24 h)
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_CAM_LOGGED_MAX = 10_000  # result ids whose dropped CAM was logged (one line each)


def check_access(users: Path | None, allow_anonymous: bool) -> Users | None:
    """The users who may sign in; refuses to serve patient-derived data to anyone without
    ``allow_anonymous=True``."""
    if users is not None:
        return Users(Path(users))
    if not allow_anonymous:
        raise MedgeError(
            "the dashboard shows patient-derived data and needs a users file: "
            "'medge dashboard add-user NAME --users FILE', then --users FILE "
            "(or --allow-anonymous / allow_anonymous=True for a throwaway local test)"
        )
    log.warning("dashboard without login: anyone who can reach it sees everything")
    return None


def create_app(
    db_path: str | Path,
    title: str = "medge",
    users: Path | None = None,
    allow_anonymous: bool = False,
    session_ttl_s: float = SESSION_TTL_S,
    login_policy: LoginPolicy | None = None,
) -> web.Application:
    """The dashboard as an aiohttp application over the store at ``db_path``; ``users`` is the
    users file (see ``medge dashboard add-user``)."""
    app = web.Application(middlewares=[_security_headers])
    app[USERS] = check_access(users, allow_anonymous)
    app[ANONYMOUS] = users is None
    app[SESSIONS] = Sessions(session_ttl_s)
    app[TITLE] = title
    app[STATIC] = STATIC_DIR
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    app[INDEX] = page.replace("{{title}}", html.escape(title))
    app[STOPPING] = asyncio.Event()

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = await asyncio.to_thread(Store, db_path)
        app[STORE] = store
        yield
        await asyncio.to_thread(store.close)

    async def on_shutdown(app: web.Application) -> None:
        app[STOPPING].set()  # every open stream returns at once

    app.cleanup_ctx.append(store_ctx)
    app.on_shutdown.append(on_shutdown)
    login.install(app, login_policy)  # throttling, trusted proxies, Secure cookies
    rules_view.install(app)  # GET /api/alert-rules
    detail.install(app)  # GET /api/results/{id}, /api/events: the detail panel
    rollouts_view.install(app)  # GET /api/rollouts: the rollouts panel
    app.router.add_get("/", _index)
    app.router.add_get("/api/me", _me)
    app.router.add_get("/api/devices", _devices)
    app.router.add_get("/api/results", _results)
    app.router.add_get("/api/alerts", _alerts)
    app.router.add_post(r"/api/alerts/{id:\d+}/ack", _ack)
    app.router.add_get("/api/history", _history)
    app.router.add_get("/api/stream", _stream)
    app.router.add_static("/static/", STATIC_DIR)
    return app


# -- handlers --------------------------------------------------------------------------------
async def _index(request: web.Request) -> web.Response:
    body = request.app[INDEX].replace("{{user}}", html.escape(login.user_of(request)))
    return web.Response(text=body, content_type="text/html", headers=NO_STORE)


async def _me(request: web.Request) -> web.Response:
    return json_reply({"user": login.user_of(request), "anonymous": request.app[ANONYMOUS]})


async def _devices(request: web.Request) -> web.Response:
    store = request.app[STORE]
    rows = await read_store("devices", lambda: read_models.devices(store))
    return _json_rows(rows, "device")


async def _results(request: web.Request) -> web.Response:
    query = request.query
    after = int_param(query.get("after"), 0, "after")
    limit = min(max(int_param(query.get("limit"), 100, "limit"), 1), MAX_LIMIT)
    site, device = device_param(request)
    store = request.app[STORE]

    def read() -> list[dict[str, Any]]:
        return _with_cams(store, read_models.results(store, max(after, 0), limit, site, device))

    return _json_rows(await read_store("results", read), "result")


async def _alerts(request: web.Request) -> web.Response:
    limit = min(max(int_param(request.query.get("limit"), ALERTS_SHOWN, "limit"), 1), MAX_LIMIT)
    store = request.app[STORE]
    return _json_rows(await read_store("alerts", lambda: list_alerts(store, limit)), "alert")


async def _ack(request: web.Request) -> web.Response:
    alert_id = int(request.match_info["id"])
    try:
        alert = await asyncio.to_thread(
            acknowledge, request.app[STORE], alert_id, login.user_of(request)
        )
    except UnknownAlert as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    except AlertError as exc:
        raise web.HTTPConflict(text=str(exc)) from None
    return json_reply(alert)


async def _history(request: web.Request) -> web.Response:
    """Per device: telemetry points (fps, latency p50, ...) and results stored per minute over
    the last ``minutes`` (default 60), for the charts."""
    minutes = min(max(int_param(request.query.get("minutes"), 60, "minutes"), 1), MAX_HISTORY_MIN)
    site, device = device_param(request)
    store = request.app[STORE]

    def read() -> dict[str, Any]:
        now = time.time()
        since = now - minutes * 60
        keys = [
            (d["site"], d["device"])
            for d in read_models.devices(store)
            if site in (None, d["site"]) and device in (None, d["device"])
        ]
        return {
            "now": now,
            "since": since,
            "devices": {
                f"{s}/{d}": {
                    "telemetry": read_models.telemetry_history(store, s, d, since),
                    "results_per_minute": read_models.results_per_minute(store, s, d, since),
                }
                for s, d in keys
            },
        }

    return json_reply(await read_store("history", read))


async def _panel_events(store: Any, last: dict[str, str]) -> list[bytes]:
    """The devices and alerts panels, each sent when it changed since ``last`` (updated)."""
    chunks: list[bytes] = []
    for name, read in (
        ("devices", lambda: read_models.devices(store)),
        ("alerts", lambda: list_alerts(store, ALERTS_SHOWN)),
    ):
        event = name
        try:
            data = _dumps_rows(await asyncio.to_thread(read), name[:-1])
        except Exception as exc:  # the store failed: say so in the stream, go on
            data, event = dumps({"error": fault(name, exc)}), f"{name}-error"
            last.pop(name, None)  # sent again in full once it can be read
        if data != last.get(event):
            if event != name:
                log.error("dashboard stream: %s", data)
            chunks.append(_event(event, data))
            last[event] = data
    return chunks


async def _stream(request: web.Request) -> web.StreamResponse:
    store, stopping = request.app[STORE], request.app[STOPPING]
    cursor = _stream_cursor(request)
    if cursor is None:  # no cursor given: only what arrives from now on
        newest = await asyncio.to_thread(read_models.results, store, 0, 1)
        cursor = newest[-1]["id"] if newest else 0
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    loop = asyncio.get_running_loop()
    last: dict[str, str] = {}
    last_write = loop.time()
    try:
        await response.write(b"retry: 2000\n\n")
        while not stopping.is_set() and login.session_alive(request):
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the client went away
            chunks = await _panel_events(store, last)
            while True:  # catch up batch by batch, each written as soon as it is read
                rows = await asyncio.to_thread(_rows_after, store, cursor, BATCH)
                chunks += [_event("result", _dumps_row(row, "result"), row["id"]) for row in rows]
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
@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        exc.headers.setdefault("Content-Security-Policy", CSP)
        raise
    if not response.prepared:  # the event stream has sent its headers already
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def _rows_after(store: Store, cursor: int, limit: int) -> list[dict[str, Any]]:
    # results(0, ...) means "the newest rows"; ids start at 1, so -1 asks for the
    # oldest rows after nothing, in id order, which is what a stream must send.
    return _with_cams(store, read_models.results(store, cursor if cursor > 0 else -1, limit))


_cam_logged: set[int] = set()


def _with_cams(store: Store, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``cam`` to the rows whose stored body carries a thumbnail that passes
    :func:`check_cam` (one query over the rows' id range; only bodies that mention a CAM are
    read). One that does not pass is left out and logged once."""
    if not rows:
        return rows
    ids = {r["id"]: r for r in rows}
    for f in read_models.cam_bodies(store, min(ids), max(ids)):
        row = ids.get(f["id"])
        if row is None:
            continue
        body = f["body"]
        try:
            body = json.loads(body) if isinstance(body, (str, bytes)) else body
        except ValueError:
            continue
        if not isinstance(body, dict) or "cam" not in body:
            continue
        cam, why = check_cam(body["cam"])
        if cam is not None:
            row["cam"] = cam
        elif f["id"] not in _cam_logged and len(_cam_logged) < _CAM_LOGGED_MAX:
            _cam_logged.add(f["id"])
            log.warning(
                "result %d of %s/%s: CAM thumbnail not shown (%s)",
                f["id"],
                row["site"],
                row["device"],
                why,
            )
    return rows


def _stream_cursor(request: web.Request) -> int | None:
    for raw in (request.headers.get("Last-Event-ID"), request.query.get("after")):
        if raw is not None and raw.strip():
            try:
                return max(int(raw), 0)
            except ValueError:
                continue
    return None


def _event(name: str, data: str, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {data}\n\n".encode()


def _json_rows(rows: list[dict[str, Any]], what: str) -> web.Response:
    return json_text(_dumps_rows(rows, what))


FAULTS = {"rows": 0}  # rows shown as an error marker instead of their data (since start)


def _dumps_row(row: dict[str, Any], what: str) -> str:
    """One row as JSON; a row that cannot be encoded (nested too deep, a hostile value) is
    sent as its keys and an ``error`` marker, named in one log line and counted: one bad row
    never costs the whole list."""
    try:
        return dumps(row)
    except (ValueError, TypeError, RecursionError) as exc:
        FAULTS["rows"] += 1
        keys = {
            k: row.get(k)
            for k in ("id", "site", "device", "seq", "kind")
            if isinstance(row.get(k), (str, int))
        }
        log.warning(
            "%s %s shown as an error: %s (%d rows so far)",
            what,
            "/".join(str(v) for v in keys.values()),
            type(exc).__name__,
            FAULTS["rows"],
        )
        return dumps({**keys, "error": f"{what} unreadable ({type(exc).__name__})"})


def _dumps_rows(rows: list[dict[str, Any]], what: str) -> str:
    return "[" + ",".join(_dumps_row(r, what) for r in rows) + "]"
