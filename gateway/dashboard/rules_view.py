"""``GET /api/alert-rules``: the alert rules the gateway runs with, as it recorded them in the
audit log (gateway.alerts.record_rules); ``{"rules": null}`` until a gateway has started on
this store. Behind the login like every other API."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from gateway.alerts import current_rules
from gateway.dashboard.keys import STORE

__all__ = ["install"]


def install(app: web.Application) -> None:
    app.router.add_get("/api/alert-rules", _alert_rules)


async def _alert_rules(request: web.Request) -> web.Response:
    rules = await asyncio.to_thread(current_rules, request.app[STORE])
    return web.Response(
        text=json.dumps({"rules": rules}, allow_nan=False),
        content_type="application/json",
        headers={"Cache-Control": "no-store", "X-Server-Time": f"{time.time():.3f}"},
    )
