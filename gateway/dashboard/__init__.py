"""The gateway's dashboard: a read-only web page over the store, updated live."""

from __future__ import annotations

from gateway.dashboard.app import DashboardServer, create_app, run_dashboard

__all__ = ["DashboardServer", "create_app", "run_dashboard"]
