"""The gateway's dashboard: a web page over the store, updated live, behind a login.

The names below are imported when first used, so that ``gateway.dashboard.cam`` (which the
gateway service uses) does not pull in aiohttp."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.dashboard.app import create_app
    from gateway.dashboard.auth import add_user
    from gateway.dashboard.server import DashboardServer, run_dashboard

__all__ = ["DashboardServer", "add_user", "create_app", "run_dashboard"]

_WHERE = {
    "DashboardServer": "gateway.dashboard.server",
    "add_user": "gateway.dashboard.auth",
    "create_app": "gateway.dashboard.app",
    "run_dashboard": "gateway.dashboard.server",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
