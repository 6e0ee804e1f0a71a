"""The dashboard's door: the middleware that asks every request for a session, and the login
and logout pages (see :mod:`gateway.dashboard.auth` for users and sessions)."""

from __future__ import annotations

import asyncio
import html
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from gateway.dashboard.auth import Session
from gateway.dashboard.keys import ANONYMOUS, SESSIONS, STATIC, STORE, TITLE, USERS

__all__ = ["COOKIE", "USER", "install", "session_alive", "user_of"]


def _request_key(name: str) -> Any:
    """web.RequestKey where aiohttp has it (3.14+, which warns about plain strings)."""
    make = getattr(web, "RequestKey", None)
    return make(name, str) if make is not None else f"medge.{name}"


COOKIE = "medge_session"
USER = _request_key("user")  # the name of the signed-in user
_TOKEN = _request_key("session-token")
PUBLIC = ("/login", "/favicon.ico")  # and /static/: style and script, no data


def user_of(request: web.Request) -> str:
    return str(request[USER])


def session_alive(request: web.Request) -> bool:
    """False once the session this request came with has ended (logout, expiry)."""
    if request.app[ANONYMOUS]:
        return True
    return request.app[SESSIONS].get(request.get(_TOKEN)) is not None


def install(app: web.Application) -> None:
    app.middlewares.append(_require_session)
    app.router.add_get("/login", _login_page)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)


def _address(request: web.Request) -> str:
    return request.remote or "unknown"


@web.middleware
async def _require_session(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    if request.method not in ("GET", "HEAD") and not _same_origin(request):
        raise web.HTTPForbidden(text="cross-origin request refused")
    if request.path in PUBLIC or request.path.startswith("/static/"):
        return await handler(request)
    if request.app[ANONYMOUS]:
        request[USER] = "anonymous"
        return await handler(request)
    token = request.cookies.get(COOKIE)
    session: Session | None = request.app[SESSIONS].get(token)
    if session is None:
        if request.path.startswith("/api/"):
            raise web.HTTPUnauthorized(
                text='{"error": "login required"}', content_type="application/json")
        raise web.HTTPSeeOther("login")
    request[USER] = session.user
    request[_TOKEN] = token
    return await handler(request)


def _same_origin(request: web.Request) -> bool:
    """A state-changing request must come from our own page (SameSite=Strict already keeps the
    cookie off cross-site requests; this refuses them outright)."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.host


def _page(request: web.Request, message: str = "", status: int = 200) -> web.Response:
    raw = (request.app[STATIC] / "login.html").read_text(encoding="utf-8")
    body = raw.replace("{{title}}", html.escape(request.app[TITLE])).replace(
        "{{message}}", html.escape(message))
    return web.Response(text=body, status=status, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def _login_page(request: web.Request) -> web.StreamResponse:
    if request.app[ANONYMOUS] or request.app[SESSIONS].get(request.cookies.get(COOKIE)):
        raise web.HTTPSeeOther("./")
    return _page(request)


async def _login(request: web.Request) -> web.StreamResponse:
    if request.app[ANONYMOUS]:
        raise web.HTTPSeeOther("./")
    sessions, users, store = request.app[SESSIONS], request.app[USERS], request.app[STORE]
    form = await request.post()
    name = str(form.get("name", ""))[:64]
    password = str(form.get("password", ""))[:1024]
    address = _address(request)
    if sessions.throttled(address):
        await asyncio.to_thread(store.add_audit, "login-throttled",
                                f"user {name!r} from {address}")
        return _page(request, "Too many failed attempts; wait a few minutes.", 429)
    if users is None or not await asyncio.to_thread(users.verify, name, password):
        sessions.failed(address)
        await asyncio.to_thread(store.add_audit, "login-failed", f"user {name!r} from {address}")
        return _page(request, "Wrong name or password.", 401)
    token = sessions.create(name)
    await asyncio.to_thread(store.add_audit, "login", f"user {name!r} from {address}")
    response = web.HTTPSeeOther("./")
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=request.secure, max_age=int(sessions.ttl_s))
    raise response


async def _logout(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSIONS].end(request.cookies.get(COOKIE))
    if session is not None:
        await asyncio.to_thread(request.app[STORE].add_audit, "logout",
                                f"user {session.user!r} from {_address(request)}")
    response = web.HTTPSeeOther("login")
    response.del_cookie(COOKIE, path="/")
    raise response
