"""Write the JSON Schemas of medge's file formats, from their pydantic models:

    docs/manifest.schema.json      edge_agent.bundle.Manifest   (a bundle's manifest.json)
    docs/agent-config.schema.json  edge_agent.config.AgentConfig (the agent's YAML config)
    docs/gateway-config.schema.json gateway.config.NodeConfig   (gateway.yaml: gateway, dashboard)

    python tools/export_schema.py           # (re)write them
    python tools/export_schema.py --check   # exit 1 naming each file that is not current

The models are the definition; these files are for editors, validators and readers in other
languages. tests/test_schema_export.py fails when a model changes and its file does not.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# file -> (module, model)
SCHEMAS: dict[str, tuple[str, str]] = {
    "docs/manifest.schema.json": ("edge_agent.bundle", "Manifest"),
    "docs/agent-config.schema.json": ("edge_agent.config", "AgentConfig"),
    "docs/gateway-config.schema.json": ("gateway.config", "NodeConfig"),
}


def render(module: str, model: str) -> str:
    """The schema of ``module.model`` as the exact text of its file."""
    cls = getattr(importlib.import_module(module), model)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"Generated from {module}.{model} by tools/export_schema.py; do not edit.",
        **cls.model_json_schema(mode="validation"),
    }
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def stale() -> list[str]:
    """The schema files whose text differs from what the models give now."""
    return [
        name
        for name, (module, model) in SCHEMAS.items()
        if not (ROOT / name).is_file()
        or (ROOT / name).read_text(encoding="utf-8") != render(module, model)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only say which files are stale")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for name in old:
            sys.stderr.write(f"{name} is not current: run python tools/export_schema.py\n")
        return 1 if old else 0
    for name, (module, model) in SCHEMAS.items():
        (ROOT / name).write_text(render(module, model), encoding="utf-8")
        sys.stdout.write(f"wrote {name}\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
