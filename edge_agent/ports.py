"""The queues between two threads of the pipeline, each with its back-pressure rule.

A :class:`Port` is a bounded queue with one of three policies, chosen by what may be lost:

- ``drop_oldest`` (live video): a full port drops its oldest item to take the new one; the
  producer (the camera) never waits, the consumer gets the freshest frames.
- ``block_then_drop`` (live sensor feeds): a full port blocks the producer up to ``block_s``
  (back-pressure), then drops the new item; never silently.
- ``block`` (the outbox): a full port blocks the producer until there is room; nothing is
  dropped. (The outbox applies it on disk itself: ``edge_agent.outbox``.)

Every drop is counted in :attr:`Port.drops` and handed to ``on_drop`` (a source counts it
among its problems, so it reaches telemetry's ``source_errors`` and the drops metric).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

__all__ = ["POLICIES", "Policy", "Port"]

Policy = Literal["drop_oldest", "block_then_drop", "block"]
POLICIES: tuple[Policy, ...] = ("drop_oldest", "block_then_drop", "block")

T = TypeVar("T")


class Port(Generic[T]):
    """A bounded, thread-safe queue with a back-pressure policy and a drop count.

    ``reason``: the name its drops are counted under (``dropped``, ``overflow``);
    ``on_drop(n)``: called, outside the lock, with the number of items each drop lost.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        policy: Policy,
        block_s: float | None = None,
        reason: str = "dropped",
        on_drop: Callable[[int], Any] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"port {name}: capacity must be >= 1, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"port {name}: unknown policy '{policy}'")
        if policy == "block_then_drop" and (block_s is None or block_s <= 0):
            raise ValueError(f"port {name}: block_then_drop needs block_s > 0")
        self.name, self.capacity, self.policy = name, capacity, policy
        self.block_s, self.reason, self.on_drop = block_s, reason, on_drop
        self.drops = 0
        self._items: deque[T] = deque()
        self._cond = threading.Condition()

    def put(self, item: T, count: int = 1) -> bool:
        """Queue ``item`` as the policy says; False when it was dropped (``count`` items lost:
        a batch message counts as the samples it held)."""
        with self._cond:
            lost, kept = 0, True
            if len(self._items) >= self.capacity:
                if self.policy == "drop_oldest":
                    self._items.popleft()
                    lost = 1
                else:
                    timeout = self.block_s if self.policy == "block_then_drop" else None
                    room = self._cond.wait_for(lambda: len(self._items) < self.capacity, timeout)
                    if not room:
                        lost, kept = count, False
            if kept:
                self._items.append(item)
                self._cond.notify_all()
            self.drops += lost
        if lost and self.on_drop is not None:
            self.on_drop(lost)
        return kept

    def get(self, timeout: float) -> T | None:
        """The oldest item, or None when none came within ``timeout`` seconds."""
        with self._cond:
            if not self._items and not self._cond.wait_for(lambda: bool(self._items), timeout):
                return None
            item = self._items.popleft()
            self._cond.notify_all()  # a blocked producer may go on
            return item

    def depth(self) -> int:
        with self._cond:
            return len(self._items)

    def clear(self) -> None:
        with self._cond:
            self._items.clear()
            self._cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        """What telemetry says of this edge."""
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "depth": self.depth(),
            "drops": self.drops,
        }
