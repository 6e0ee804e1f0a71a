from __future__ import annotations

from edge_agent.errors import MedgeError

__all__ = ["ConversionError"]


class ConversionError(MedgeError):
    """A model could not be converted, or its inputs (data, labels) do not fit it."""
