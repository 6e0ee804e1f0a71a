"""Running the dashboard: in a background thread (:class:`DashboardServer`) or in the
foreground until Ctrl-C (:func:`run_dashboard`).

``GET /healthz`` answers without login (before the session check): JSON with each worker's
liveness (the HTTP server, the store, which it reads) and the age of the newest stored result;
200 when all are alive, 503 otherwise. :func:`run_dashboard` is supervised: a store that fails
``STORE_FAILURES_FATAL`` checks in a row ends it with one line naming it (exit non-zero)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edge_agent.errors import MedgeError, one_line
from gateway.dashboard.app import check_access, create_app
from gateway.dashboard.auth import SESSION_TTL_S
from gateway.dashboard.keys import STORE
from gateway.dashboard.throttle import LoginPolicy
from gateway.db import redact

if TYPE_CHECKING:
    from gateway.config import DashboardConfig

__all__ = ["DashboardServer", "login_policy_of", "run_config", "run_dashboard"]

log = logging.getLogger("medge.gateway.dashboard")

SHUTDOWN_S = 1.0  # how long stop() lets requests finish before they are cancelled
CHECK_S = 5.0  # run_dashboard checks its store this often
STORE_FAILURES_FATAL = 3  # failed store checks in a row that end run_dashboard


async def health(app: web.Application) -> tuple[bool, dict[str, Any]]:
    """(all alive, the JSON body of /healthz): the server answers (it is running this), and
    the store answers a read; the age of the newest stored result."""
    store: dict[str, Any] = {"alive": True}
    ages: dict[str, float] = {}
    try:
        rows = await asyncio.to_thread(app[STORE].query, "SELECT max(received) AS t FROM results")
        newest = rows[0]["t"] if rows else None
        if newest is not None:
            ages["stored"] = round(max(0.0, time.time() - float(newest)), 3)
    except Exception as exc:  # any failure of the store is its ill health
        store = {"alive": False, "error": one_line(f"{type(exc).__name__}: {exc}")}
    ok = bool(store["alive"])
    return ok, {
        "status": "ok" if ok else "failing",
        "workers": {"dashboard-http": {"alive": True}, "store": store},
        "last_message_age_s": ages,
    }


@web.middleware
async def _healthz(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path != "/healthz":
        return await handler(request)
    ok, body = await health(request.app)
    return web.Response(
        status=200 if ok else 503,
        text=json.dumps(body, sort_keys=True),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _app(db_path: str | Path, **app_args: Any) -> web.Application:
    app = create_app(db_path, **app_args)
    app.middlewares.insert(0, _healthz)  # before the login: a probe carries no session
    return app


async def _start(
    db_path: str | Path, host: str, port: int, **app_args: Any
) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(_app(db_path, **app_args), shutdown_timeout=SHUTDOWN_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    shown = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
    if ":" in shown:
        shown = f"[{shown}]"
    return runner, f"http://{shown}:{bound_port}/"


class DashboardServer:
    """The dashboard served from a background thread with its own event loop.

    ``with DashboardServer(db, users=users_file) as dash: open(dash.url)``; ``port=0`` picks a
    free port. Without ``users`` it refuses to start unless ``allow_anonymous=True``.
    """

    def __init__(
        self,
        db_path: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        title: str = "medge",
        users: Path | None = None,
        allow_anonymous: bool = False,
        session_ttl_s: float = SESSION_TTL_S,
        login_policy: LoginPolicy | None = None,
    ) -> None:
        check_access(users, allow_anonymous)  # refuse at once, not in the server's thread
        self.db_path, self.host, self.port, self.title = db_path, host, port, title
        self._app_args: dict[str, Any] = {
            "title": title,
            "users": users,
            "allow_anonymous": allow_anonymous,
            "session_ttl_s": session_ttl_s,
            "login_policy": login_policy,
        }
        self.url = ""  # set by start(), with the port actually bound
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def from_config(
        cls, cfg: DashboardConfig, session_ttl_s: float = SESSION_TTL_S
    ) -> DashboardServer:
        """A server with the settings of gateway.yaml's ``dashboard:`` section."""
        return cls(
            cfg.target(),
            cfg.host,
            cfg.port,
            cfg.title,
            users=cfg.users,
            allow_anonymous=cfg.allow_anonymous,
            session_ttl_s=session_ttl_s,
            login_policy=login_policy_of(cfg),
        )

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> DashboardServer:
        """Serve; returns once the server accepts connections (raises if it cannot bind)."""
        if self._thread is not None:
            raise RuntimeError("dashboard already started")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="medge-dashboard", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        log.info("dashboard on %s (database %s)", self.url, redact(self.db_path))
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                self._runner, self.url = loop.run_until_complete(
                    _start(self.db_path, self.host, self.port, **self._app_args)
                )
                self.port = int(self.url.rsplit(":", 1)[1].rstrip("/"))
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def stop(self) -> None:
        """Close open streams and the server, and join the thread (about a second at most)."""
        thread, loop, runner = self._thread, self._loop, self._runner
        if thread is None or loop is None:
            return
        if runner is not None and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(SHUTDOWN_S + 3)
            except Exception:  # a stop must not raise; say what went wrong
                log.warning("dashboard did not shut down cleanly", exc_info=True)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        if thread.is_alive():
            log.warning("dashboard thread still running after stop()")
        self._thread, self._loop, self._runner = None, None, None
        log.info("dashboard stopped")


def login_policy_of(cfg: DashboardConfig) -> LoginPolicy:
    """The login policy of a ``dashboard:`` section (trusted proxies, Secure cookies)."""
    return LoginPolicy(trusted_proxies=tuple(cfg.trusted_proxy), secure_cookies=cfg.secure_cookies)


def run_config(cfg: DashboardConfig) -> None:
    """:func:`run_dashboard` with the settings of gateway.yaml's ``dashboard:`` section."""
    run_dashboard(
        cfg.target(),
        cfg.host,
        cfg.port,
        cfg.title,
        users=cfg.users,
        allow_anonymous=cfg.allow_anonymous,
        login_policy=login_policy_of(cfg),
    )


def run_dashboard(
    db_path: str | Path,
    host: str,
    port: int,
    title: str = "medge",
    users: Path | None = None,
    allow_anonymous: bool = False,
    login_policy: LoginPolicy | None = None,
) -> None:
    """Serve the dashboard until SIGINT (Ctrl-C) or SIGTERM."""
    check_access(users, allow_anonymous)

    async def main() -> None:
        runner, url = await _start(
            db_path,
            host,
            port,
            title=title,
            users=users,
            allow_anonymous=allow_anonymous,
            login_policy=login_policy,
        )
        log.info("dashboard on %s (database %s)", url, redact(db_path))
        stop = asyncio.Event()
        watch = asyncio.create_task(_supervise(runner.app, stop), name="dashboard-supervisor")
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                handled.append(sig)
        try:
            await stop.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            death = watch.result() if watch.done() else None
            watch.cancel()
            await runner.cleanup()
            log.info("dashboard stopped")
        if death is not None:
            raise MedgeError(f"dashboard: worker store died: {death}")

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


async def _supervise(app: web.Application, stop: asyncio.Event) -> str | None:
    """Check the store every CHECK_S; after STORE_FAILURES_FATAL failures in a row, stop the
    dashboard and return why (None when stopped otherwise)."""
    failures = 0
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), CHECK_S)
        if stop.is_set():
            return None
        ok, body = await health(app)
        if ok:
            failures = 0
            continue
        failures += 1
        why = str(body["workers"]["store"].get("error", "unknown"))
        log.error("dashboard: store check failed (%d in a row): %s", failures, why)
        if failures >= STORE_FAILURES_FATAL:
            stop.set()
            return why
    return None
