"""The gateway's dashboard: a web page over the store, updated live, behind a login."""

from __future__ import annotations

from gateway.dashboard.app import create_app
from gateway.dashboard.auth import add_user
from gateway.dashboard.server import DashboardServer, run_dashboard

__all__ = ["DashboardServer", "add_user", "create_app", "run_dashboard"]
