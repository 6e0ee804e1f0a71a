"""``GET /api/rollouts``: the staged rollouts (docs/rollouts.md) the page's *Rollouts* panel
shows, read-only and behind the login like every other API.

Every active rollout (running, paused, aborting) and the most recent others, at most
:data:`SHOWN` in all, newest first, each exactly as ``medge gateway rollout status ID --json``
has it (:func:`gateway.rollout_store.status`: the stages with their gates and measures, every
device with its state, the command it owes and its shadow telemetry), plus ``gates``: the gates
of the stage it is at (the last stage once it has completed), each with its ``verdict``:
``pass``, ``fail`` or ``not measured``. One rollout that cannot be read is sent as its id and an
``error``, never a 500 for the whole list.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from gateway.dashboard.keys import STORE
from gateway.dashboard.replies import fault, json_reply, read_store
from gateway.rollout_store import ACTIVE, rollouts, status
from gateway.store import Store

__all__ = ["SHOWN", "install", "recent_rollouts"]

log = logging.getLogger("medge.gateway.dashboard")
SHOWN = 20  # rollouts in the panel: every active one, then the most recent others


def install(app: web.Application) -> None:
    app.router.add_get("/api/rollouts", _rollouts)


async def _rollouts(request: web.Request) -> web.Response:
    store = request.app[STORE]

    def read() -> dict[str, Any]:
        now = time.time()
        return {"now": now, "rollouts": recent_rollouts(store, SHOWN, now)}

    return json_reply(await read_store("rollouts", read))


def recent_rollouts(
    store: Store, limit: int = SHOWN, now: float | None = None
) -> list[dict[str, Any]]:
    """The status documents of every active rollout and of the most recent others, at most
    ``limit`` in all (active ones first to be kept), newest first."""
    rows = rollouts(store)  # newest first
    active = [r["id"] for r in rows if r["status"] in ACTIVE]
    others = [r["id"] for r in rows if r["status"] not in ACTIVE]
    ids = sorted(active + others[: max(limit - len(active), 0)], reverse=True)
    out = []
    for rid in ids:
        try:
            doc = status(store, rid, now)
        except Exception as exc:  # one unreadable rollout is an error marker, not a 500
            why = fault(f"rollout {rid}", exc)
            log.warning("dashboard: %s", why)
            out.append({"id": rid, "error": why})
            continue
        doc["gates"] = current_gates(doc)
        out.append(doc)
    return out


def current_gates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The gates of the stage the rollout is at (the last one once it is past them all), each
    with the stage's index and a ``verdict``."""
    stages = doc["stages"]
    if not stages:
        return []
    index = min(int(doc["stage"]), len(stages) - 1)
    verdicts = {True: "pass", False: "fail", None: "not measured"}
    return [{**g, "stage": index, "verdict": verdicts[g["holds"]]} for g in stages[index]["gates"]]
