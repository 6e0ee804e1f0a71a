"""docs/manifest.schema.json, docs/agent-config.schema.json and docs/gateway-config.schema.json
are what their pydantic models give today (tools/export_schema.py writes them; `make schemas`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from edge_agent.bundle import Manifest
from edge_agent.config import AgentConfig
from gateway.config import GatewayConfig, NodeConfig

ROOT = Path(__file__).resolve().parent.parent


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("export_schema", ROOT / "tools/export_schema.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name",
    [
        "docs/manifest.schema.json",
        "docs/agent-config.schema.json",
        "docs/gateway-config.schema.json",
    ],
)
def test_the_committed_schema_is_current(name: str) -> None:
    tool = _tool()
    module, model = tool.SCHEMAS[name]
    assert (ROOT / name).read_bytes() == tool.render(module, model).encode(), (
        f"{name} is stale: run python tools/export_schema.py (make schemas) and commit it"
    )


def test_the_schemas_describe_the_models_fields() -> None:
    manifest = json.loads((ROOT / "docs/manifest.schema.json").read_text())
    config = json.loads((ROOT / "docs/agent-config.schema.json").read_text())
    assert set(manifest["properties"]) == set(Manifest.model_fields)
    assert set(config["properties"]) == set(AgentConfig.model_fields)
    assert config["additionalProperties"] is False, "the config is strict (extra=forbid)"
    assert manifest["description"] and config["description"], "the class docstrings"
    node = json.loads((ROOT / "docs/gateway-config.schema.json").read_text())
    assert set(node["properties"]) == set(NodeConfig.model_fields) == {"gateway", "dashboard"}
    assert node["additionalProperties"] is False
    gateway = node["$defs"]["GatewayConfig"]
    assert set(gateway["properties"]) == set(GatewayConfig.model_fields)
    assert gateway["additionalProperties"] is False and gateway["description"]


def test_check_mode_says_current_or_names_the_stale_file() -> None:
    r = subprocess.run(
        [sys.executable, "tools/export_schema.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (r.returncode, r.stderr) == (0, "")
