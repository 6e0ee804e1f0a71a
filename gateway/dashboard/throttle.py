"""Throttling password guesses: per client address and per user, safe under concurrency.

A login attempt first *reserves* a slot (:meth:`LoginThrottle.reserve`), under one lock and
before the slow scrypt verify; the verify's outcome then *settles* it. A reservation counts as
a failure until it settles, so a burst of parallel guesses cannot all pass the check before the
first one fails: at most the limit are ever evaluated.

- Per address: ``address_limit`` failures within ``window_s`` and that address gets 429 until
  the oldest failure leaves the window. Only the attacker's address: a user signing in from
  elsewhere is not affected.
- Per user (any address): the first ``user_free`` failures within ``window_s`` cost nothing;
  after ``n >= user_free`` failures the next attempt waits ``user_delay_s * 2**(n - user_free)``
  (at most ``user_max_delay_s``) after the last failure, one attempt at a time. A delay,
  never a lock: the right password always gets in once the delay has passed. A success
  clears the user's failures. Names that are not users are throttled the same (no hint
  which names exist).

Addresses come from the TCP peer; ``X-Forwarded-For`` (and ``X-Forwarded-Proto``) only when
the peer is one of ``trusted_proxies`` — from anyone else the header is ignored.
"""

from __future__ import annotations

import ipaddress
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["LoginPolicy", "LoginThrottle", "Reservation", "client_address"]

_MAX_TRACKED = 10_000  # addresses or names remembered at once; the oldest are forgotten


def _networks(entries: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            from edge_agent.errors import MedgeError, one_line

            raise MedgeError(
                one_line(
                    f"trusted proxy {entry!r} is not an address or network "
                    "(e.g. 10.0.0.5 or 10.0.0.0/24)"
                )
            ) from exc
    return tuple(out)


@dataclass(frozen=True)
class LoginPolicy:
    """How the dashboard's login guards against guessing, and what it trusts."""

    address_limit: int = 10
    window_s: float = 300.0
    user_free: int = 5
    user_delay_s: float = 1.0
    user_max_delay_s: float = 60.0
    trusted_proxies: tuple[str, ...] = ()
    """addresses/networks of reverse proxies whose X-Forwarded-For/-Proto are believed"""
    secure_cookies: bool = False
    """always mark the session cookie Secure (the dashboard is reached over TLS)"""
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        default=(), init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "networks", _networks(self.trusted_proxies))

    def trusts(self, peer: str | None) -> bool:
        if not peer or not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def user_delay(self, failures: int) -> float:
        """Seconds an attempt waits after the user's last failure, with ``failures`` counted."""
        extra = failures - self.user_free
        if extra < 0:
            return 0.0
        return min(self.user_delay_s * 2.0 ** min(extra, 60), self.user_max_delay_s)


def client_address(peer: str | None, forwarded_for: str | None, policy: LoginPolicy) -> str:
    """The client's address: the TCP peer, or — only when the peer is a trusted proxy — the
    nearest address in X-Forwarded-For that is not itself a trusted proxy."""
    address = peer or "unknown"
    if not forwarded_for or not policy.trusts(peer):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # a malformed chain: believe only what we saw ourselves
        address = hop
        if not policy.trusts(hop):
            break
    return address


@dataclass
class _Track:
    failures: list[float] = field(default_factory=list)
    inflight: int = 0
    seen: float = 0.0


@dataclass(frozen=True)
class Reservation:
    """The answer to :meth:`LoginThrottle.reserve`: ``granted``, or why not and for how long."""

    granted: bool
    user: str
    address: str
    why: str = ""  # "address" or "user" when refused
    retry_after: float = 0.0


class LoginThrottle:
    """The failure counts per address and per user, behind one lock."""

    def __init__(
        self, policy: LoginPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or LoginPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses: dict[str, _Track] = {}
        self._users: dict[str, _Track] = {}
        self.evaluated = 0
        """Password verifies let through (each costs one scrypt)."""
        self.refused = {"address": 0, "user": 0}
        """Attempts refused before any verify, by which limit."""

    def _track(self, table: dict[str, _Track], key: str, now: float) -> _Track:
        track = table.get(key)
        if track is None:
            if len(table) >= _MAX_TRACKED:  # bounded: forget the longest-quiet half
                for old in sorted(table, key=lambda k: table[k].seen)[: _MAX_TRACKED // 2]:
                    if table[old].inflight == 0:
                        del table[old]
            track = table[key] = _Track()
        track.seen = now
        window = self.policy.window_s
        track.failures = [t for t in track.failures if now - t < window]
        return track

    def reserve(self, user: str, address: str) -> Reservation:
        """Check both limits and, if they allow it, reserve one verify (settle it later)."""
        p = self.policy
        with self._lock:
            now = self._clock()
            a = self._track(self._addresses, address, now)
            u = self._track(self._users, user, now)
            if len(a.failures) + a.inflight >= p.address_limit:
                self.refused["address"] += 1
                oldest = a.failures[0] if a.failures else now
                return Reservation(
                    False, user, address, "address", max(oldest + p.window_s - now, 1.0)
                )
            pending = len(u.failures) + u.inflight
            if pending >= p.user_free:
                last = u.failures[-1] if u.failures else now
                wait = 0.0 if not u.failures else last + p.user_delay(pending) - now
                if u.inflight > 0 or wait > 0:
                    self.refused["user"] += 1
                    return Reservation(False, user, address, "user", max(wait, 0.1))
            a.inflight += 1
            u.inflight += 1
            self.evaluated += 1
            return Reservation(True, user, address)

    def settle(self, reservation: Reservation, success: bool) -> None:
        """The verify of a granted reservation is done: count a failure, or clear the user's."""
        if not reservation.granted:
            return
        with self._lock:
            now = self._clock()
            a = self._track(self._addresses, reservation.address, now)
            u = self._track(self._users, reservation.user, now)
            a.inflight = max(a.inflight - 1, 0)
            u.inflight = max(u.inflight - 1, 0)
            if success:
                u.failures.clear()
            else:
                a.failures.append(now)
                u.failures.append(now)

    @staticmethod
    def retry_header(reservation: Reservation) -> str:
        return str(max(1, math.ceil(reservation.retry_after)))
