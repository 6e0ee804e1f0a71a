"""Who may see the dashboard: a users file, server-side sessions, login and logout.

Everything the dashboard shows is derived from patients, so every page and API needs a session.

- Users file (``medge dashboard add-user NAME --users FILE``): JSON, mode 0600 (refused
  otherwise), each password as scrypt (``cryptography``'s ``Scrypt``, n=2^15, r=8, p=1) of a
  random 16-byte salt. Checked in constant time, and an unknown name costs the same scrypt as a
  known one. Re-read when it changes, so a new user needs no restart.
- Sessions: a random token (``secrets.token_urlsafe``) in a cookie that is HttpOnly,
  SameSite=Strict (and Secure over HTTPS); the server keeps only its SHA-256 with the user and
  an absolute expiry (``SESSION_TTL_S``). Logout ends it at once; so does a restart.
- Login, failed login and logout are written to the store's audit table. Guessing is
  throttled per address and per user, before any scrypt runs (gateway.dashboard.throttle).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edge_agent.errors import MedgeError
from edge_agent.files import write_atomic

__all__ = ["SESSION_TTL_S", "Session", "Sessions", "Users", "add_user", "check_name"]

SESSION_TTL_S = 8 * 3600.0  # a shift
MIN_PASSWORD = 10
_SCRYPT = {"n": 2**15, "r": 8, "p": 1}
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise MedgeError(f"user name {name!r} must be 1-64 of [A-Za-z0-9_.@-]")
    return name


def _hash(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password.encode("utf-8"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def add_user(users_file: Path, name: str, password: str | None = None) -> str:
    """Add (or replace) a user in ``users_file``, creating it mode 0600; returns the password
    (a fresh random one when ``password`` is None, e.g. for a throwaway demo user)."""
    check_name(name)
    if password is None:
        password = secrets.token_urlsafe(15)
    if len(password) < MIN_PASSWORD:
        raise MedgeError(f"a password needs at least {MIN_PASSWORD} characters")
    path = Path(users_file)
    data: dict[str, Any] = {"version": 1, "users": {}}
    if path.exists():
        data = _read(path)
    salt = os.urandom(16)
    data["users"][name] = {
        "salt": _b64(salt),
        "hash": _b64(_hash(password, salt, **_SCRYPT)),
        **_SCRYPT,
        "created": round(time.time(), 3),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_atomic(path, text.encode("utf-8"), 0o600)  # temp, fsync, rename, fsync the dir
    return password


def _read(path: Path) -> dict[str, Any]:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MedgeError(f"users file {path} is readable by others: chmod 600 {path}")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MedgeError(f"cannot read users file {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise MedgeError(f"users file {path} is not JSON: {exc}") from exc
    if (
        not isinstance(data, dict)
        or data.get("version") != 1
        or not isinstance(data.get("users"), dict)
    ):
        raise MedgeError(f"users file {path} is not a medge users file (version 1)")
    return data


class Users:
    """The users file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._users: dict[str, dict[str, Any]] = {}
        self._dummy: dict[str, Any] = {
            "salt": _b64(os.urandom(16)),
            "hash": _b64(os.urandom(32)),
            **_SCRYPT,
        }
        self.verifies = 0
        """Passwords checked so far (each one scrypt): the throttle's tests and metrics."""
        self._reload()
        if not self._users:
            raise MedgeError(
                f"users file {self.path} has no users: medge dashboard add-user NAME "
                f"--users {self.path}"
            )

    def _reload(self) -> None:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise MedgeError(
                f"no users file at {self.path}: create one with 'medge dashboard add-user "
                f"NAME --users {self.path}'"
            ) from exc
        stamp = (st.st_mtime, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._users = dict(_read(self.path)["users"])
                self._stamp = stamp

    def names(self) -> list[str]:
        return sorted(self._users)

    def verify(self, name: str, password: str) -> bool:
        """True if ``password`` is ``name``'s. Takes one scrypt whether or not the user exists."""
        with contextlib.suppress(MedgeError):  # a bad edit of the file: keep the last users
            self._reload()
        with self._lock:
            entry = self._users.get(name)
            self.verifies += 1
        known = isinstance(entry, dict)
        record = entry if isinstance(entry, dict) else self._dummy  # i.e. if known
        try:
            salt = base64.b64decode(record["salt"])
            want = base64.b64decode(record["hash"])
            got = _hash(password, salt, int(record["n"]), int(record["r"]), int(record["p"]))
        except (KeyError, TypeError, ValueError):
            return False
        return hmac.compare_digest(got, want) and known


@dataclass(frozen=True)
class Session:
    user: str
    created: float
    expires: float


class Sessions:
    """Server-side sessions: the token's SHA-256 -> user and expiry."""

    def __init__(self, ttl_s: float = SESSION_TTL_S, clock: Any = time.time) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._by_digest: dict[bytes, Session] = {}

    @staticmethod
    def _digest(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    def create(self, user: str) -> str:
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._by_digest = {k: s for k, s in self._by_digest.items() if s.expires > now}
            self._by_digest[self._digest(token)] = Session(user, now, now + self.ttl_s)
        return token

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        digest = self._digest(token)
        with self._lock:
            session = self._by_digest.get(digest)
            if session is not None and session.expires <= self._clock():
                del self._by_digest[digest]
                session = None
        return session

    def end(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            return self._by_digest.pop(self._digest(token), None)
