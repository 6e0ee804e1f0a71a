"""medge gateway: the fog-node service that stores what devices send, and the dashboard."""

from __future__ import annotations

from gateway.broker import RunningBroker, start_broker
from gateway.service import Gateway, GatewayStats
from gateway.store import Store

__all__ = ["Gateway", "GatewayStats", "RunningBroker", "Store", "start_broker"]
