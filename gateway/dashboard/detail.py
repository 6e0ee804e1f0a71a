"""What a result's detail panel shows, read-only and behind the login like every other API.

``GET /api/results/{id}``: one stored result (or event) with what its body carries, each part
checked before it is sent: the class scores with the names known for them, the CAM heatmap and
the input thumbnail (strict-base64 PNGs, :func:`gateway.dashboard.cam.check_png`), the
segmentation outline (``mask``: contour and size) and a fitted ellipse when the body has one,
the model's name and version (from the bundle id ``name@version#hash``). Anything of the wrong
type is left out, never passed on for the page to interpret.

``GET /api/events?device=SITE/DEVICE&minutes=60``: the device's events of the last hour as a
timeline: each one's start, its duration once it has ended, its peak score.

The page puts every string in as text and every image as a data: URL property (app.js).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from aiohttp import web

from gateway import read_models
from gateway.dashboard.cam import check_cam, check_png
from gateway.dashboard.keys import STORE
from gateway.dashboard.replies import device_param, dumps, int_param, json_text, read_store

__all__ = ["detail_of", "install", "timeline"]

MAX_CLASSES = 1000  # scores shown as bars
MAX_POINTS = 4096  # vertices of a contour
MAX_EVENT_MIN = 24 * 60
_TEXT = 1024


def install(app: web.Application) -> None:
    app.router.add_get(r"/api/results/{id:\d+}", _result)
    app.router.add_get("/api/events", _events)


async def _result(request: web.Request) -> web.Response:
    result_id = int(request.match_info["id"])
    if result_id > 2**63 - 1:
        raise web.HTTPNotFound(text="no such result")
    store = request.app[STORE]

    def read() -> dict[str, Any] | None:
        row = read_models.result(store, result_id)
        if row is None:
            return None
        names: dict[int, str] = {}
        if isinstance(row.get("bundle"), str):
            names = read_models.class_names(
                store, row["site"], row["device"], row["bundle"], result_id
            )
        return detail_of(row, names)

    detail = await read_store("result", read)
    if detail is None:
        raise web.HTTPNotFound(text="no such result")
    return json_text(dumps(detail))


async def _events(request: web.Request) -> web.Response:
    site, device = device_param(request)
    if not site or not device:
        raise web.HTTPBadRequest(text="device=SITE/DEVICE is needed")
    minutes = int_param(request.query.get("minutes"), 60, "minutes")
    minutes = min(max(minutes, 1), MAX_EVENT_MIN)
    store = request.app[STORE]

    def read() -> dict[str, Any]:
        now = time.time()
        since = now - minutes * 60
        rows = read_models.device_events(store, site, device, since)
        return {"now": now, "since": since, "events": timeline(rows)}

    return json_text(dumps(await read_store("events", read)))


# -- shaping (plain functions) ----------------------------------------------------------------
def _num(v: Any) -> float | int | None:
    if type(v) is int and abs(v) < 2**63:
        return v
    if type(v) is float and math.isfinite(v):
        return v
    return None


def _text(v: Any) -> str | None:
    return v[:_TEXT] if isinstance(v, str) else None


def _point(v: Any) -> list[float | int] | None:
    if isinstance(v, list) and len(v) == 2:
        x, y = _num(v[0]), _num(v[1])
        if x is not None and y is not None:
            return [x, y]
    return None


def _body(row: dict[str, Any]) -> dict[str, Any]:
    raw = row.get("body")
    try:
        body = json.loads(raw) if isinstance(raw, (str, bytes)) else raw
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def _model(bundle: Any) -> dict[str, str] | None:
    """``name@version#hash`` (edge_agent.bundle.Bundle.id) in its parts."""
    if not isinstance(bundle, str) or "@" not in bundle:
        return None
    name, rest = bundle.split("@", 1)
    version, _, digest = rest.partition("#")
    return {"name": name[:_TEXT], "version": version[:_TEXT], "hash": digest[:64]}


def _classes(body: dict[str, Any], row: dict[str, Any], names: dict[int, str]) -> list[Any]:
    scores = body.get("scores")
    if not isinstance(scores, list) or not 0 < len(scores) <= MAX_CLASSES:
        return []
    given = body.get("labels")
    labels: list[Any] = given if isinstance(given, list) else []
    known = dict(names)
    for i, name in (
        (row.get("pred"), row.get("pred_label")),
        (row.get("label"), row.get("label_name")),
    ):
        if type(i) is int and isinstance(name, str):
            known[i] = name
    out = []
    for i, s in enumerate(scores):
        name = _text(labels[i]) if i < len(labels) else None
        out.append({"index": i, "name": name or _text(known.get(i)), "score": _num(s)})
    return out


def _mask(body: dict[str, Any]) -> dict[str, Any] | None:
    mask = body.get("mask")
    if not isinstance(mask, dict):
        return None
    size = mask.get("size")
    if not (
        isinstance(size, list) and len(size) == 2 and all(type(n) is int and n > 0 for n in size)
    ):
        return None
    given = mask.get("contour")
    contour: list[Any] = given if isinstance(given, list) else []
    points = [p for p in (_point(v) for v in contour[:MAX_POINTS]) if p is not None]
    bbox = mask.get("bbox")
    ok_bbox = isinstance(bbox, list) and len(bbox) == 4 and all(_num(v) is not None for v in bbox)
    return {
        "size": size,
        "contour": points,
        "bbox": bbox if ok_bbox else None,
        "area_frac": _num(mask.get("area_frac")),
        "components": _num(mask.get("components")),
    }


def _ellipse(body: dict[str, Any]) -> dict[str, Any] | None:
    """The fitted ellipse (edge_agent.measure.Ellipse.body) of the body or of its mask."""
    given = body.get("mask")
    mask: dict[str, Any] = given if isinstance(given, dict) else {}
    e = body.get("ellipse", mask.get("ellipse"))
    if not isinstance(e, dict):
        return None
    center = _point(e.get("center", e.get("centre")))
    axes = _point(e.get("axes"))
    angle = _num(e.get("angle", 0))
    if center is None or axes is None or angle is None or min(axes) <= 0:
        return None
    return {"center": center, "axes": axes, "angle": angle}


def detail_of(row: dict[str, Any], names: dict[int, str] | None = None) -> dict[str, Any]:
    """A stored result row (with its ``body``) as the detail panel shows it."""
    body = _body(row)
    out = {k: v for k, v in row.items() if k != "body"}
    out["model"] = _model(row.get("bundle"))
    out["latency_ms"] = _num(body.get("latency_ms"))
    out["classes"] = _classes(body, row, names or {})
    out["positive_label"] = _text(body.get("positive_label"))
    cam, _ = check_cam(body.get("cam")) if "cam" in body else (None, None)
    if cam is not None:
        out["cam"] = cam
    thumb = body.get("thumbnail")
    if isinstance(thumb, dict):
        size, _ = check_png(thumb.get("png"))
        if size is not None:
            out["thumbnail"] = {"png": thumb["png"], "width": size[0], "height": size[1]}
    mask = _mask(body)
    if mask is not None:
        out["mask"] = mask
    ellipse = _ellipse(body)
    if ellipse is not None:
        out["ellipse"] = ellipse
    if row.get("kind") == "event":
        out["event"] = {
            k: _text(body.get(k)) if k in ("event", "state", "label") else _num(body.get(k))
            for k in ("event", "state", "label", "start", "end", "duration_s", "peak")
        }
    return out


def timeline(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Event messages (oldest first) as events: a start and its end are one event (the same
    name and ``start``), placed at the start message's time (or, without it, the end's minus
    the duration); ``duration_s`` once it has ended, else null (still going). Update outcomes
    and anything without an event name are left out."""
    events: dict[tuple[str, Any], dict[str, Any]] = {}
    for row in rows:
        body = _body(row)
        name, t = _text(body.get("event")), _num(row.get("time"))
        if not name or t is None:
            continue
        key = (name, _num(body.get("start")))
        e = events.setdefault(
            key,
            {"id": row["id"], "event": name, "time": t, "duration_s": None, "peak": None},
        )
        e["peak"] = _num(body.get("peak")) if _num(body.get("peak")) is not None else e["peak"]
        e["alert"] = bool(body.get("alert")) or e.get("alert", False)
        if body.get("state") == "end":
            duration = _num(body.get("duration_s"))
            e["duration_s"] = max(float(duration), 0.0) if duration is not None else 0.0
            if e["id"] == row["id"]:  # its start is older than the window: place it back
                e["time"] = t - e["duration_s"]
    return sorted(events.values(), key=lambda e: (e["time"], e["id"]))
