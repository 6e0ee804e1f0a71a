"""Each package lists its public names in __all__, and every name listed exists."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "edge_agent",
    "converter",
    "gateway",
    "gateway.dashboard",
    "models",
    "medge",
    "edge_agent.bundle",
    "edge_agent.envelope",
    "edge_agent.outbox",
    "edge_agent.topics",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_lists_exactly_existing_public_names(name: str) -> None:
    mod = importlib.import_module(name)
    assert hasattr(mod, "__all__"), f"{name} has no __all__"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert missing == []
    assert sorted(mod.__all__) == sorted(set(mod.__all__)), "no duplicates"
