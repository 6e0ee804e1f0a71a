"""MQTT topic tree: ``medge/v1/<site>/<device>/<kind>``. See docs/topics.md."""

from __future__ import annotations

import re
from typing import NamedTuple

from edge_agent.errors import EnvelopeError
from edge_agent.reasons import Reason

__all__ = ["DOWN_KINDS", "ROOT", "UP_KINDS", "TopicParts", "check_name", "parse", "topic"]

ROOT = "medge/v1"
UP_KINDS = ("result", "event", "telemetry", "state")
DOWN_KINDS = ("ack", "cmd", "limits")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TopicParts(NamedTuple):
    site: str
    device: str
    kind: str


def check_name(what: str, value: str, reason: Reason = Reason.TOPIC) -> str:
    """A site or device name: 1-64 of letters, digits, '_', '.', '-' (no MQTT wildcards).
    ``reason``: TOPIC for a name from a topic, MALFORMED for one from a message header."""
    if type(value) is not str or not _NAME.match(value):
        shown = value[:80] if isinstance(value, str) else f"<{type(value).__name__}>"
        raise EnvelopeError(f"{what} name {shown!r} must be 1-64 of [A-Za-z0-9_.-]", reason)
    return value


def topic(site: str, device: str, kind: str) -> str:
    if kind not in UP_KINDS + DOWN_KINDS:
        raise EnvelopeError(f"unknown topic kind {kind[:32]!r}", Reason.TOPIC)
    return f"{ROOT}/{check_name('site', site)}/{check_name('device', device)}/{kind}"


def parse(name: str) -> TopicParts:
    """Split a topic of the tree; raise EnvelopeError for anything else."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:2]) != ROOT:
        raise EnvelopeError(
            f"topic {name[:200]!r} is not under {ROOT}/<site>/<device>/<kind>", Reason.TOPIC
        )
    site, device, kind = parts[2:]
    check_name("site", site)
    check_name("device", device)
    if kind not in UP_KINDS + DOWN_KINDS:
        raise EnvelopeError(f"topic {name[:200]!r} has unknown kind {kind[:32]!r}", Reason.TOPIC)
    return TopicParts(site, device, kind)
