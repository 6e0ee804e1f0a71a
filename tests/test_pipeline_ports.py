"""The three back-pressure policies of edge_agent.ports, each with its drop count."""

from __future__ import annotations

import threading
import time

import pytest

from edge_agent.ports import Port


def test_drop_oldest_never_waits_and_counts_each_drop() -> None:
    told: list[int] = []
    port: Port[int] = Port("frames", 2, "drop_oldest", on_drop=told.append)
    t0 = time.monotonic()
    assert all(port.put(i) for i in range(5))
    assert time.monotonic() - t0 < 0.5, "the producer never waits"
    assert [port.get(0.1), port.get(0.1), port.get(0.01)] == [3, 4, None]  # the freshest
    assert port.drops == 3 and told == [1, 1, 1]
    assert port.snapshot() == {"policy": "drop_oldest", "capacity": 2, "depth": 0, "drops": 3}


def test_block_then_drop_waits_for_room_then_drops_and_counts() -> None:
    told: list[int] = []
    port: Port[str] = Port("feed", 1, "block_then_drop", 0.2, "overflow", told.append)
    assert port.put("a")
    t0 = time.monotonic()
    assert not port.put("batch", count=3)  # nobody reads: blocked for block_s, then dropped
    assert 0.15 < time.monotonic() - t0 < 2
    assert port.drops == 3 and told == [3] and port.depth() == 1
    threading.Timer(0.05, port.get, args=(0.1,)).start()  # a reader makes room in time
    assert port.put("b") and port.get(1) == "b" and port.drops == 3


def test_block_waits_as_long_as_it_takes_and_drops_nothing() -> None:
    port: Port[int] = Port("outbox", 1, "block")
    port.put(0)
    threading.Timer(0.3, port.get, args=(1,)).start()
    t0 = time.monotonic()
    assert port.put(1)
    assert time.monotonic() - t0 >= 0.25 and port.drops == 0 and port.get(0.1) == 1


def test_a_port_is_refused_without_what_its_policy_needs() -> None:
    with pytest.raises(ValueError, match="block_s"):
        Port("feed", 4, "block_then_drop")
    with pytest.raises(ValueError, match="capacity"):
        Port("x", 0, "block")
    with pytest.raises(ValueError, match="policy"):
        Port("x", 1, "spill")  # type: ignore[arg-type]
