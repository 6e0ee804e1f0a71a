"""Why a message was rejected: one typed code per class of fault.

Metrics labels and audit rows use the code, never the message text (which names devices, values
and may be hostile). A handler that fails in a way nobody foresaw is ``HANDLER``: still counted,
still survived. Every class shows in the metrics at 0 until it happens.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Reason"]


class Reason(str, Enum):
    """The reason code of one rejected message (its value is the metrics label)."""

    TOPIC = "topic"  # topic outside medge/v1/<site>/<device>/<kind>, or bad names
    SIZE = "size"  # over the size limit
    MALFORMED = "malformed"  # not JSON, wrong types, missing/unknown fields, too deep
    SCHEMA = "schema"  # an opened body (telemetry, state, result, ack, cmd) breaks its schema
    UNKNOWN_KEY = "unknown_key"  # sealed to a key this receiver does not hold
    DEVICE = "device"  # unknown, revoked, expired or foreign device
    SIGNATURE = "signature"  # not signed by the device it names
    AUTHENTICATION = "authentication"  # AES-GCM/HPKE refuses it (tampered)
    HEADER_MISMATCH = "header_mismatch"  # header names another site/device/kind than the topic
    CLOCK = "clock"  # time too far in the future
    REPLAY = "replay"  # state/telemetry not newer than the last one
    RATE_LIMIT = "rate_limit"  # over the device's flood limit
    STORE = "store"  # the store refused this one row (the rest of its batch is stored)
    HANDLER = "handler"  # any other exception while handling the message

    def __str__(self) -> str:
        return self.value
