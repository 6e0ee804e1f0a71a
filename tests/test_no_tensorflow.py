"""The device never imports TensorFlow, Keras, or another medge package: the agent's real entry
point, run, lists what it imported. The same rule read from the source, for every package, is
tests/test_import_contracts.py."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway import Gateway, Store
from gateway.broker import RunningBroker

FORBIDDEN = ("tensorflow", "keras", "tf_keras", "torch", "converter", "models", "gateway")

pytestmark = pytest.mark.slow


def test_running_the_agent_imports_no_tensorflow(  # type: ignore[no-untyped-def]
    bundle_dir: Path, mosquitto: RunningBroker, tmp_path: Path, identity, opener
) -> None:
    from models import breast_cnn

    config = tmp_path / "agent.yaml"
    config.write_text(
        textwrap.dedent(f"""\
        site: ward-a
        device: us-01
        bundle: {bundle_dir}
        identity: {identity("us-01")}
        broker: {{host: {mosquitto.host}, port: {mosquitto.port}, protocol: "5"}}
        source: {{path: {breast_cnn.DATA}, split: val, rate_hz: 0, limit: 10}}
        outbox: {{path: {tmp_path / "outbox.sqlite"}}}
        """)
    )
    with (
        Store(tmp_path / "gw.sqlite") as store,
        Gateway(store, opener, mosquitto.host, mosquitto.port),
    ):
        # -X importtime lists every module the real entry point imports
        r = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "medge",
                "agent",
                "run",
                "--config",
                str(config),
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert '"acked": 10' in r.stdout
        assert store.result_count() == 10
    imported = {
        m.group(1).strip().split(".")[0]
        for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S.*)$", r.stderr, re.M)
    }
    assert "ai_edge_litert" in imported and "edge_agent" in imported
    assert not imported & set(FORBIDDEN), sorted(imported & set(FORBIDDEN))
