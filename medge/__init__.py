"""medge: medical deep-learning models from the workstation to edge devices, watched by the
hospital. The command-line program lives in :mod:`medge.cli`."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
