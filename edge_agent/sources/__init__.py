"""Data sources: each yields :class:`Sample` objects and nothing else."""

from __future__ import annotations

from edge_agent.sources.base import Sample
from edge_agent.sources.npz import NpzReplay, load_labelled

__all__ = ["NpzReplay", "Sample", "load_labelled"]
