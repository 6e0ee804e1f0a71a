"""How a test waits for what another thread or process does: ``wait_for`` (fail the test
after a timeout) or ``within`` (just say whether it happened in time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

__all__ = ["wait_for", "within"]

T = TypeVar("T")


def within(cond: Callable[[], T], timeout: float, every: float = 0.02) -> T | None:
    """Poll ``cond`` every ``every`` seconds until it returns something true, and return that;
    None after ``timeout`` seconds. ``cond`` gets a last try at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(every, left))


def wait_for(
    cond: Callable[[], T],
    timeout: float = 5.0,
    what: str | Callable[[], object] = "the condition",
    every: float = 0.02,
) -> T:
    """``within``, failing the test on a timeout with what was awaited (``what``, or what it
    returns when it is a callable: the state worth seeing at that moment)."""
    got = within(cond, timeout, every)
    if not got:
        said = what() if callable(what) else what
        pytest.fail(f"timed out after {timeout:g} s waiting for {said}")
    return got
