"""The keys under which the dashboard's modules find what the app holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web

from gateway.dashboard.auth import Sessions, Users
from gateway.store import Store

__all__ = ["ANONYMOUS", "INDEX", "SESSIONS", "STATIC", "STOPPING", "STORE", "TITLE", "USERS"]

STORE = web.AppKey("store", Store)
STOPPING = web.AppKey("stopping", asyncio.Event)
INDEX = web.AppKey("index", str)
TITLE = web.AppKey("title", str)
STATIC = web.AppKey("static", Path)
USERS: web.AppKey[Users | None] = web.AppKey("users", Users | None)  # type: ignore[arg-type]
SESSIONS = web.AppKey("sessions", Sessions)
ANONYMOUS = web.AppKey("anonymous", bool)
