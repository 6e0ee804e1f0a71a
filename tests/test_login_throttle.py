"""The dashboard's login under attack: parallel guesses against a real dashboard HTTP server,
addresses told apart by real loopback source addresses (127.0.0.1 vs 127.0.0.2), spoofed and
trusted X-Forwarded-For, Secure cookies; and the throttle's arithmetic on a test clock."""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path

import pytest

from gateway.dashboard import DashboardServer, add_user
from gateway.dashboard.throttle import LoginPolicy, LoginThrottle, client_address
from gateway.store import Store

USER, PASSWORD = "clinician", "correct horse battery"
ATTACKER, CLINIC = "127.0.0.1", "127.0.0.2"  # both loopback: Linux routes all of 127/8 here
FAST = LoginPolicy(user_delay_s=0.05, user_max_delay_s=0.4)  # the same rules, short delays


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users.json"
    add_user(path, USER, PASSWORD)
    return path


def post_login(
    port: int,
    name: str,
    password: str,
    source: str = ATTACKER,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str]]:
    """POST /login; the status and headers (the page's text under ``body``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=(source, 0))
    form = urllib.parse.urlencode({"name": name, "password": password})
    try:
        conn.request(
            "POST",
            "/login",
            body=form,
            headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})},
        )
        response = conn.getresponse()
        body = response.read().decode()
        return response.status, {**{k.lower(): v for k, v in response.getheaders()}, "body": body}
    finally:
        conn.close()


def audit(store: Store, action: str) -> list[str]:
    return [r["detail"] for r in store.audit(action, limit=10_000)]


def test_200_parallel_guesses_evaluate_at_most_the_limit(users: Path, tmp_path: Path) -> None:
    with (
        Store(tmp_path / "gw.sqlite") as store,
        DashboardServer(store.path, users=users, login_policy=FAST) as dash,
    ):
        statuses: list[int] = []
        lock = threading.Lock()
        start = threading.Barrier(50)

        def guess(i: int) -> None:
            if i < 50:
                start.wait()  # the first 50 leave together
            status, _ = post_login(dash.port, USER, f"wrong-{i}")
            with lock:
                statuses.append(status)

        threads = [threading.Thread(target=guess, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        count = Counter(statuses)
        assert set(count) <= {401, 429}, count
        evaluated = len(audit(store, "login-failed"))
        assert evaluated == count[401], "each evaluated guess is audited once"
        assert 1 <= evaluated <= FAST.address_limit, count
        assert count[429] == 200 - evaluated
        assert len(audit(store, "login-throttled")) == count[429]

        # Guessing on, one at a time, waiting out each delay on the name: the address reaches
        # its limit, and then it is refused even the right password ...
        for _ in range(100):
            status, headers = post_login(dash.port, USER, "wrong-again", source=ATTACKER)
            if status == 429 and "from this address" in headers["body"]:
                break
            if status == 429:
                time.sleep(min(float(headers["retry-after"]), FAST.user_max_delay_s))
        assert len(audit(store, "login-failed")) == FAST.address_limit
        status, headers = post_login(dash.port, USER, PASSWORD, source=ATTACKER)
        assert status == 429 and "from this address" in headers["body"]
        assert int(headers["retry-after"]) >= 1
        # ... while the user, from another address, gets in: after the delay the guesses
        # put on the name, never locked out.
        for _ in range(50):
            status, headers = post_login(dash.port, USER, PASSWORD, source=CLINIC)
            if status != 429:
                break
            time.sleep(min(float(headers["retry-after"]), FAST.user_max_delay_s))
        assert status == 303, status
        assert "Secure" not in headers["set-cookie"], "plain HTTP, no proxy: not Secure"
        assert audit(store, "login")[0] == f"user {USER!r} from {CLINIC}"
        assert len(audit(store, "login-failed")) == FAST.address_limit, "refusals verify nothing"


def test_spoofed_forwarded_for_from_a_non_proxy_is_ignored(users: Path, tmp_path: Path) -> None:
    with (
        Store(tmp_path / "gw.sqlite") as store,
        DashboardServer(store.path, users=users, login_policy=FAST) as dash,
    ):
        for i in range(FAST.address_limit):  # a new "address" each time, and new names
            status, _ = post_login(
                dash.port,
                f"guess{i}",
                "wrong-password",
                headers={"X-Forwarded-For": f"198.51.100.{i}"},
            )
            assert status == 401
        status, _ = post_login(
            dash.port, "guess-more", "wrong-password", headers={"X-Forwarded-For": "198.51.100.99"}
        )
        assert status == 429, "the header did not make a new address"
        assert all(d.endswith(f"from {ATTACKER}") for d in audit(store, "login-failed"))
        status, headers = post_login(
            dash.port, USER, PASSWORD, source=CLINIC, headers={"X-Forwarded-Proto": "https"}
        )
        assert status == 303 and "Secure" not in headers["set-cookie"], "proto not believed"


def test_a_trusted_proxy_names_the_client_and_tls(users: Path, tmp_path: Path) -> None:
    policy = LoginPolicy(user_delay_s=0.05, user_max_delay_s=0.4, trusted_proxies=(ATTACKER,))
    with (
        Store(tmp_path / "gw.sqlite") as store,
        DashboardServer(store.path, users=users, login_policy=policy) as dash,
    ):
        for i in range(policy.address_limit):
            status, _ = post_login(
                dash.port, f"guess{i}", "wrong-password", headers={"X-Forwarded-For": "203.0.113.7"}
            )
            assert status == 401
        status, _ = post_login(
            dash.port, "guess-more", "wrong-password", headers={"X-Forwarded-For": "203.0.113.7"}
        )
        assert status == 429, "the client the proxy named is throttled"
        # another client behind the same proxy is not; a forged first hop does not help
        status, headers = post_login(
            dash.port,
            USER,
            PASSWORD,
            headers={"X-Forwarded-For": "203.0.113.7, 192.0.2.44", "X-Forwarded-Proto": "https"},
        )
        assert status == 303 and "Secure" in headers["set-cookie"]
        assert audit(store, "login")[0] == f"user {USER!r} from 192.0.2.44"
        # an X-Forwarded-For from an address that is not the proxy is ignored
        status, _ = post_login(
            dash.port,
            "x",
            "wrong-password",
            source=CLINIC,
            headers={"X-Forwarded-For": "203.0.113.99"},
        )
        assert status == 401 and audit(store, "login-failed")[0].endswith(f"from {CLINIC}")


def test_secure_cookies_flag(users: Path, tmp_path: Path) -> None:
    policy = LoginPolicy(secure_cookies=True)
    with (
        Store(tmp_path / "gw.sqlite") as store,
        DashboardServer(store.path, users=users, login_policy=policy) as dash,
    ):
        status, headers = post_login(dash.port, USER, PASSWORD)
        assert status == 303 and "Secure" in headers["set-cookie"]


# -- the throttle on its own, on a test clock ------------------------------------------------
def test_delays_grow_per_user_and_never_lock() -> None:
    now = [0.0]
    t = LoginThrottle(
        LoginPolicy(address_limit=1000, user_free=3, user_delay_s=1.0, user_max_delay_s=8.0),
        clock=lambda: now[0],
    )
    waits = []
    for i in range(8):
        slot = t.reserve(USER, f"10.0.0.{i}")  # a new address each time
        if not slot.granted:
            waits.append(slot.retry_after)
            now[0] += slot.retry_after
            slot = t.reserve(USER, f"10.0.0.{i}")
        assert slot.granted
        t.settle(slot, success=False)
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0], "exponential, capped"
    now[0] += 8.0
    slot = t.reserve(USER, "10.0.0.99")
    assert slot.granted, "never a hard lock"
    t.settle(slot, success=True)
    assert t.reserve(USER, "10.0.0.99").granted, "a success clears the name's failures"


def test_reservations_hold_under_concurrency() -> None:
    t = LoginThrottle(LoginPolicy(address_limit=10, user_free=1000))
    barrier = threading.Barrier(200)
    granted = []

    def attempt(i: int) -> None:
        barrier.wait()
        slot = t.reserve(f"user{i}", "10.9.9.9")
        if slot.granted:
            granted.append(slot)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(200)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(granted) == 10 and t.evaluated == 10 and t.refused["address"] == 190


@pytest.mark.parametrize(
    ("peer", "header", "trusted", "expected"),
    [
        ("10.0.0.1", "1.2.3.4", (), "10.0.0.1"),
        ("10.0.0.1", "1.2.3.4", ("10.0.0.0/24",), "1.2.3.4"),
        ("10.0.0.1", "1.2.3.4, 10.0.0.2", ("10.0.0.0/24",), "1.2.3.4"),
        ("10.0.0.1", "6.6.6.6, 1.2.3.4", ("10.0.0.1",), "1.2.3.4"),
        ("10.0.0.1", "not-an-ip", ("10.0.0.1",), "10.0.0.1"),
        ("::1", "2001:db8::5", ("::1",), "2001:db8::5"),
    ],
)
def test_client_address(peer: str, header: str, trusted: tuple[str, ...], expected: str) -> None:
    assert client_address(peer, header, LoginPolicy(trusted_proxies=trusted)) == expected
