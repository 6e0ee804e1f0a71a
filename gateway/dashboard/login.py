"""The dashboard's door: the middleware that asks every request for a session, and the login
and logout pages (see :mod:`gateway.dashboard.auth` for users and sessions, and
:mod:`gateway.dashboard.throttle` for how guessing is throttled and which proxy is trusted)."""

from __future__ import annotations

import asyncio
import html
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.dashboard.auth import Session
from gateway.dashboard.keys import ANONYMOUS, SESSIONS, STATIC, STORE, TITLE, USERS
from gateway.dashboard.throttle import LoginPolicy, LoginThrottle, client_address

__all__ = ["COOKIE", "THROTTLE", "USER", "install", "session_alive", "user_of"]

THROTTLE = web.AppKey("login-throttle", LoginThrottle)


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


def install(app: web.Application, policy: LoginPolicy | None = None) -> None:
    app[THROTTLE] = LoginThrottle(policy)
    app.middlewares.append(_require_session)
    app.router.add_get("/login", _login_page)
    app.router.add_post("/login", _login)
    app.router.add_post("/logout", _logout)


def _address(request: web.Request) -> str:
    """The client: the TCP peer, or what a trusted proxy says in X-Forwarded-For."""
    return client_address(
        request.remote, request.headers.get("X-Forwarded-For"), request.app[THROTTLE].policy
    )


def _secure(request: web.Request) -> bool:
    """Whether the session cookie is Secure: --secure-cookies, TLS here, or TLS at a trusted
    proxy (X-Forwarded-Proto: https, believed from that proxy only)."""
    policy = request.app[THROTTLE].policy
    if policy.secure_cookies or request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return proto == "https" and policy.trusts(request.remote)


@web.middleware
async def _require_session(request: web.Request, handler: Handler) -> web.StreamResponse:
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
                text='{"error": "login required"}', content_type="application/json"
            )
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
        "{{message}}", html.escape(message)
    )
    return web.Response(
        text=body, status=status, content_type="text/html", headers={"Cache-Control": "no-store"}
    )


async def _login_page(request: web.Request) -> web.StreamResponse:
    if request.app[ANONYMOUS] or request.app[SESSIONS].get(request.cookies.get(COOKIE)):
        raise web.HTTPSeeOther("./")
    return _page(request)


async def _login(request: web.Request) -> web.StreamResponse:
    if request.app[ANONYMOUS]:
        raise web.HTTPSeeOther("./")
    sessions, users, store = request.app[SESSIONS], request.app[USERS], request.app[STORE]
    throttle = request.app[THROTTLE]
    form = await request.post()
    name = str(form.get("name", ""))[:64]
    password = str(form.get("password", ""))[:1024]
    address = _address(request)
    seen = f"user {name!r} from {address}"
    # checked and reserved in one step, before the slow verify: parallel guesses cannot all
    # pass the check before the first of them has failed
    slot = throttle.reserve(name, address)
    if not slot.granted:
        await asyncio.to_thread(store.add_audit, "login-throttled", f"{seen} ({slot.why})")
        text = (
            "Too many failed attempts from this address; wait a few minutes."
            if slot.why == "address"
            else "Too many failed attempts for this name; try again in a moment."
        )
        response = _page(request, text, 429)
        response.headers["Retry-After"] = throttle.retry_header(slot)
        return response
    ok = False
    try:
        ok = users is not None and await asyncio.to_thread(users.verify, name, password)
    finally:
        throttle.settle(slot, ok)
    if not ok:
        await asyncio.to_thread(store.add_audit, "login-failed", seen)
        return _page(request, "Wrong name or password.", 401)
    token = sessions.create(name)
    await asyncio.to_thread(store.add_audit, "login", seen)
    response = web.HTTPSeeOther("./")
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="Strict",
        path="/",
        secure=_secure(request),
        max_age=int(sessions.ttl_s),
    )
    raise response


async def _logout(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSIONS].end(request.cookies.get(COOKIE))
    if session is not None:
        await asyncio.to_thread(
            request.app[STORE].add_audit,
            "logout",
            f"user {session.user!r} from {_address(request)}",
        )
    response = web.HTTPSeeOther("login")
    response.del_cookie(COOKIE, path="/")
    raise response
