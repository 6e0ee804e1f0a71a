"""tests/waiting.py, the one way tests wait: it returns what came true, or fails saying what."""

from __future__ import annotations

import itertools
import time

import pytest
from waiting import wait_for, within


def test_wait_for_returns_the_first_true_value() -> None:
    calls = itertools.count()
    assert wait_for(lambda: next(calls) >= 3 and "ready", 5, "three calls", every=0.001) == "ready"


def test_a_timeout_fails_the_test_naming_what_and_its_state_then() -> None:
    seen = [0]
    started = time.monotonic()
    said = r"after 0.05 s waiting for 2 results \(had 0\)"
    with pytest.raises(pytest.fail.Exception, match=said):
        wait_for(lambda: seen[0] >= 2, 0.05, lambda: f"2 results (had {seen[0]})")
    assert 0.05 <= time.monotonic() - started < 2


def test_within_says_none_on_a_timeout_and_tries_at_least_once() -> None:
    assert within(lambda: 0, 0.03) is None
    calls = itertools.count()
    assert within(lambda: next(calls) == 1, 0.0) is None  # no time at all: one try
    assert next(calls) == 1
    assert within(lambda: True, 0.0) is True
