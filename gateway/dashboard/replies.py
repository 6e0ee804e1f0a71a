"""The dashboard's JSON replies and store reads: one way to encode (NaN and infinities as null),
to answer (no caching, the server's clock in ``X-Server-Time``), to read query parameters, and
to turn a failing store into one 503 with a one-line reason."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from edge_agent.errors import one_line

__all__ = [
    "NO_STORE",
    "device_param",
    "dumps",
    "fault",
    "finite",
    "int_param",
    "json_reply",
    "json_text",
    "read_store",
]

log = logging.getLogger("medge.gateway.dashboard")
T = TypeVar("T")
NO_STORE = {"Cache-Control": "no-store"}


def device_param(request: web.Request) -> tuple[str | None, str | None]:
    site: str | None = request.query.get("site") or None
    device: str | None = request.query.get("device") or None
    if device and "/" in device:  # "site/device", the way the page names a device
        site, device = device.split("/", 1)
    return site, device


def int_param(raw: str | None, default: int, name: str) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None


def finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def dumps(value: Any) -> str:
    """JSON a browser can parse: NaN and infinities (possible in telemetry) become null."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(finite(value), separators=(",", ":"), allow_nan=False)


def json_reply(value: Any) -> web.Response:
    return json_text(dumps(value))


def json_text(text: str) -> web.Response:
    # X-Server-Time lets the page say "3 s ago" right even when its clock is off.
    headers = {**NO_STORE, "X-Server-Time": f"{time.time():.3f}"}
    return web.Response(text=text, content_type="application/json", headers=headers)


async def read_store(what: str, read: Callable[[], T]) -> T:
    """Run a store read in a thread; a failing store is one 503 with a one-line reason (the
    page shows it as an error state), logged in one line, never a bare 500."""
    try:
        return await asyncio.to_thread(read)
    except web.HTTPException:
        raise
    except Exception as exc:
        why = fault(what, exc)
        log.error("dashboard: %s", why)
        raise web.HTTPServiceUnavailable(
            text=dumps({"error": why}), content_type="application/json"
        ) from None


def fault(what: str, exc: BaseException) -> str:
    """One line: what could not be read, and why."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = one_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, 200)
    return f"cannot read {what}: {reason}"
