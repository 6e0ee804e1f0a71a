"""The one exception tree of medge.

Every package raises a subclass of :class:`MedgeError`; outside errors are translated at the
boundary with ``raise XError(...) from exc``. The CLI turns any of them into one clear line and
a non-zero exit. It lives in ``edge_agent`` because that package imports none of ours.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BundleError",
    "ConfigError",
    "EnvelopeError",
    "MedgeError",
    "SourceError",
]


class MedgeError(Exception):
    """Base of every error medge raises on purpose."""


class BundleError(MedgeError):
    """A bundle is missing, malformed, tampered with, or does not match its model."""


class BackendError(MedgeError):
    """An inference runtime cannot be imported or refuses the model."""


class EnvelopeError(MedgeError):
    """A message on the wire is malformed, unsupported or inconsistent with its topic."""


class SourceError(MedgeError):
    """A data source cannot be opened or read."""


class ConfigError(MedgeError):
    """A configuration file is invalid; the message names the field (and line where known)."""
