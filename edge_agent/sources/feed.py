"""What the threaded live sensor sources (MQTT, serial) add to :mod:`edge_agent.sources.live`:
a bounded queue between the thread that receives and the stream that yields, and its settings.

Queue policy (a ``block_then_drop`` port, ``edge_agent.ports``): sensor samples are never
dropped silently. A full queue blocks the receiver (back-pressure) for up to ``block_s``;
only then is the message dropped, counted as ``overflow`` in the source's errors (telemetry's
``source_errors``) and told in one log line.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from edge_agent.ports import Port
from edge_agent.sources.base import Problems
from edge_agent.sources.live import CsvTime, FeedFormat, LiveSettings, SampleChecks

__all__ = ["CsvTime", "FeedFormat", "FeedSettings", "QueueSize", "SampleChecks", "feed_port"]

QueueSize = Annotated[
    int, Field(ge=1, description="Messages (serial: lines) held between receiver and model.")
]


class FeedSettings(LiveSettings):
    """The settings every threaded live sensor feed shares; a source adds its own (connection,
    kind) and may change a default. Defaults here are the MQTT source's; serial reads CSV with
    times."""

    queue: QueueSize = 1000
    block_s: float = Field(
        default=2.0,
        gt=0,
        description="A full queue blocks the receiver this long, then drops "
        "the message (line) and counts it as 'overflow'.",
    )


def feed_port(name: str, size: int, block_s: float, problems: Problems) -> Port[Any]:
    """The ``block_then_drop`` port between a feed's receiving thread and its stream: a drop
    is counted as ``overflow`` among the source's problems."""

    def dropped(n: int) -> None:
        problems.add(
            "overflow",
            "queue of %d full for %g s: %d message(s) dropped",
            size,
            block_s,
            n,
            every=False,
            count=n,
        )

    return Port(f"{name}:feed", size, "block_then_drop", block_s, "overflow", dropped)
