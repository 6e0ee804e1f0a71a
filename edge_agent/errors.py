"""The one exception tree of medge.

Every package raises a subclass of :class:`MedgeError`; outside errors are translated at the
boundary with ``raise XError(...) from exc``. The CLI turns any of them into one clear line and
a non-zero exit. It lives in ``edge_agent`` because that package imports none of ours.
"""

from __future__ import annotations

from edge_agent.reasons import Reason

__all__ = [
    "BackendError",
    "BundleError",
    "ConfigError",
    "EnvelopeError",
    "MedgeError",
    "SourceError",
    "one_line",
]


class MedgeError(Exception):
    """Base of every error medge raises on purpose."""


def one_line(text: str, limit: int = 300) -> str:
    """``text`` as one printable line of at most ``limit`` characters: control characters
    (newlines from an untrusted key or value among them) are shown escaped, never obeyed."""
    flat = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class BundleError(MedgeError):
    """A bundle is missing, malformed, tampered with, or does not match its model."""


class BackendError(MedgeError):
    """An inference runtime cannot be imported or refuses the model."""


class EnvelopeError(MedgeError):
    """A message on the wire is malformed, unsupported or inconsistent with its topic.

    ``reason`` is the typed code that metrics and audit record (edge_agent.reasons)."""

    def __init__(self, message: str, reason: Reason = Reason.MALFORMED) -> None:
        super().__init__(one_line(message))
        self.reason = reason


class SourceError(MedgeError):
    """A data source cannot be opened or read."""


class ConfigError(MedgeError):
    """A configuration file is invalid; the message names the field (and line where known)."""
