"""medge edge agent: the on-device runtime. Imports numpy, LiteRT, paho-mqtt, pydantic, PyYAML
and cryptography only: never TensorFlow, Keras, or any other medge package."""

from __future__ import annotations

from edge_agent.agent import Agent, AgentReport
from edge_agent.bundle import Bundle, Manifest
from edge_agent.config import AgentConfig, load_config
from edge_agent.envelope import Envelope
from edge_agent.errors import (
    BackendError,
    BundleError,
    ConfigError,
    EnvelopeError,
    MedgeError,
    SourceError,
)
from edge_agent.model import LoadedModel
from edge_agent.outbox import Outbox

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentReport",
    "BackendError",
    "Bundle",
    "BundleError",
    "ConfigError",
    "Envelope",
    "EnvelopeError",
    "LoadedModel",
    "Manifest",
    "MedgeError",
    "Outbox",
    "SourceError",
    "load_config",
]
