"""The fog node's config file (gateway/config.py, docs/gateway-config.md): strict, errors at
the line, flags over the file over defaults, paths relative to the file."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from medge_process import start_medge, wait_serving

from edge_agent.errors import ConfigError
from gateway.config import (
    GatewayConfig,
    NodeConfig,
    load_dashboard_config,
    load_gateway_config,
)

EXAMPLE = """\
gateway:
  site_dir: site
  broker:
    host: 10.0.0.2
    port: 8883
    tls: true
  store:
    db: data/gw.sqlite
  limits:
    device_rate: 50
  batching:
    window: 0.01
  alerts:
    silence_after: 20
  metrics:
    port: 9100
dashboard:
  port: 8081
  users: users.json
"""


def _write(tmp: Path, text: str) -> Path:
    p = tmp / "gateway.yaml"
    p.write_text(text)
    return p


def test_the_file_sets_what_it_names_and_paths_are_relative_to_it(tmp_path: Path) -> None:
    cfg = load_gateway_config(_write(tmp_path, EXAMPLE))
    assert cfg.site_dir == tmp_path / "site"
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("10.0.0.2", 8883, True)
    assert cfg.store.target() == tmp_path / "data" / "gw.sqlite"
    assert cfg.limits.device_rate == 50 and cfg.limits.device_burst == 1000  # the default
    assert cfg.batching.window == 0.01 and cfg.metrics.port == 9100
    assert cfg.forward_outbox() == tmp_path / "data" / "gw.forward.sqlite"
    dash = load_dashboard_config(tmp_path / "gateway.yaml")
    assert dash.port == 8081 and dash.users == tmp_path / "users.json"
    assert dash.target() == tmp_path / "data" / "gw.sqlite", "the gateway's store, named once"


def test_a_flag_beats_the_file_which_beats_the_default(tmp_path: Path) -> None:
    path = _write(tmp_path, EXAMPLE)
    cfg = load_gateway_config(
        path, {"broker.port": 1884, "store.db": "other.sqlite", "batching.when_idle": True}
    )
    assert cfg.broker.port == 1884 and cfg.broker.host == "10.0.0.2"
    assert cfg.store.db == "other.sqlite", "a flag's path is the working directory's"
    assert cfg.batching.when_idle and cfg.batching.window == 0.01
    assert load_dashboard_config(path, {"port": 9000}).port == 9000


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "gateway:\n  site_dir: s\n  limits:\n    device_rate: -1\n",
            ":4: gateway.limits.device_rate: Input should be greater than or equal to 0",
        ),
        (
            "gateway:\n  site_dir: s\n  broker:\n    hots: x\n",
            ":4: gateway.broker.hots: Extra inputs are not permitted",
        ),
        ("gateway:\n  broker:\n    host: x\n", ":1: gateway.site_dir: Field required"),
        (
            "dashboard:\n  port: 8080\n  title: t\n  secure_cookies: maybe\n",
            ":4: dashboard.secure_cookies: Input should be a valid boolean, unable to interpret "
            "input",
        ),
        (
            "gateway:\n  site_dir: s\n  forward:\n    to: cloud\n",
            ":4: gateway.forward.to: Value error, 'cloud' is not HOST:PORT",
        ),
        ("gatway:\n  site_dir: s\n", ":1: gatway: Extra inputs are not permitted"),
    ],
)
def test_an_error_names_the_file_the_line_and_the_key(
    tmp_path: Path, text: str, where: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_gateway_config(path) if "dashboard" not in text else load_dashboard_config(path)
    assert str(exc.value) == f"{path}{where}"


def test_a_bad_flag_is_named_as_a_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^broker.port \(from the command line\)"):
        load_gateway_config(None, {"site_dir": "s", "broker.port": 0})


@pytest.mark.parametrize(
    ("over", "why"),
    [
        ({"tier": "cloud", "forward.to": "c:1883"}, "cloud opens every message itself"),
        ({"forward.backfill": "24h"}, "forward.backfill needs forward.to"),
        (
            {"forward.to": "c:1883", "store.db": "postgresql://u@h/db"},
            "needs --forward-outbox FILE",
        ),
    ],
)
def test_combinations_no_field_can_refuse(over: dict[str, object], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load_gateway_config(None, {"site_dir": "s", **over})


def test_not_yaml_or_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_gateway_config(_write(tmp_path, "gateway: [\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_gateway_config(_write(tmp_path, "- 1\n"))


def test_every_field_has_a_description() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            ann = field.annotation
            for sub in (ann, *getattr(ann, "__args__", ())):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    missing += walk(sub)
        return missing

    assert walk(NodeConfig) == []
    assert GatewayConfig.model_config.get("extra") == "forbid"


# -- medge gateway check-config / run --config -------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from medge.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_passes_a_good_file_and_warns_of_the_broker(
    tmp_path: Path, site_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.broker import free_port

    path = _write(
        tmp_path,
        f"gateway:\n  site_dir: {site_dir}\n  store:\n    db: gw.sqlite\n"
        f"  broker:\n    port: {free_port('127.0.0.1')}\n"
        "dashboard:\n  allow_anonymous: true\n",
    )
    code, out, _ = _cli(capsys, "gateway", "check-config", str(path), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["ok"] and doc["summary"] == "site ward-a, tier fog, dashboard"
    assert any("not there yet, created on the first run" in c for c in doc["checks"])
    assert len(doc["warnings"]) == 1 and "not reachable" in doc["warnings"][0]
    assert not (tmp_path / "gw.sqlite").exists(), "check-config creates nothing"


def test_check_config_points_at_the_line_and_refuses_open_keys(
    tmp_path: Path, site_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, f"gateway:\n  site_dir: {site_dir}\n  batching:\n    window: x\n")
    code, _, err = _cli(capsys, "gateway", "check-config", str(path))
    assert code == 2 and f"{path}:4: gateway.batching.window:" in err
    site = tmp_path / "site"
    shutil.copytree(site_dir, site)
    (site / "recipient.json").chmod(0o644)
    path = _write(tmp_path, "gateway:\n  site_dir: site\n")
    code, _, err = _cli(capsys, "gateway", "check-config", str(path))
    assert code == 2
    assert f"{site}/recipient.json: private key is readable by others" in err


def test_gateway_run_reads_the_file_and_flags_override_it(
    tmp_path: Path, site_dir: Path, mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """`gateway run --config`: the file's broker and store, a flag's metrics port; the
    process ends on SIGTERM with the counts on stdout."""
    from test_gateway_metrics import scrape, value

    from gateway.broker import free_port

    port = free_port("127.0.0.1")
    path = _write(
        tmp_path,
        f"gateway:\n  site_dir: {site_dir}\n  store:\n    db: gw.sqlite\n"
        f"  broker:\n    port: {mosquitto.port}\n  metrics:\n    port: 1\n",
    )
    proc = start_medge(
        "gateway", "run", "--config", str(path), "--metrics-port", str(port),
        "--log-level", "warning",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        m = wait_serving(proc, lambda: scrape(url), 20, "the metrics endpoint")
        assert value(m, "medge_gateway_messages_received_total") == 0
        assert (tmp_path / "gw.sqlite").exists(), "the store the file names, beside it"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out)["received"] == 0


def test_the_dashboard_section_serves_the_gateways_store(tmp_path: Path) -> None:
    import urllib.request

    from gateway import Store
    from gateway.dashboard.server import DashboardServer

    path = _write(
        tmp_path,
        "gateway:\n  site_dir: s\n  store:\n    db: gw.sqlite\n"
        "dashboard:\n  allow_anonymous: true\n  title: Ward A\n",
    )
    with Store(tmp_path / "gw.sqlite"):
        pass
    cfg = load_dashboard_config(path, {"port": 0})
    with DashboardServer.from_config(cfg) as dash:
        assert dash.title == "Ward A" and dash.db_path == tmp_path / "gw.sqlite"
        with urllib.request.urlopen(dash.url + "healthz", timeout=5) as r:  # noqa: S310
            assert r.status == 200
