"""PostgreSQL storage beyond the Store class: the whole gateway (two workers on one MQTT 5
shared subscription, real Mosquitto) stores an agent's sealed results of real BreastMNIST
images in one database, exactly once, on both engines; a lost server connection is opened
again; a bad URL is one clear line without its password."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest
from pg import new_database

from edge_agent import Agent, AgentConfig, Bundle
from gateway import Gateway, Store, read_models
from gateway.broker import RunningBroker
from gateway.db import StoreError, is_url, redact
from models import breast_cnn

SITE = "ward-a"


def test_urls_are_told_apart_and_passwords_never_shown(tmp_path: Path) -> None:
    assert is_url("postgresql://gw@db.ward/medge") and is_url("postgres://gw@db/medge")
    # a URL that went through pathlib.Path (e.g. a dashboard's argument) lost a slash
    assert is_url(Path("postgresql://gw@db.ward:5432/medge"))
    assert not is_url(tmp_path / "gw.sqlite") and not is_url("sqlite:///gw.sqlite")
    assert redact("postgresql://gw:s3cret@db:5432/medge") == "postgresql://gw:***@db:5432/medge"
    assert redact("postgresql://db/medge?password=s3cret&sslmode=require") == (
        "postgresql://db/medge?password=***&sslmode=require"
    )
    with Store(f"sqlite:///{tmp_path}/by-url.sqlite") as store:
        assert store.dialect == "sqlite" and store.path == tmp_path / "by-url.sqlite"
    assert (tmp_path / "by-url.sqlite").exists()


def test_the_db_option_takes_a_file_or_a_url(postgres_url: str, tmp_path: Path) -> None:
    """``--db`` of ``medge gateway run`` and ``medge dashboard`` (an override of the config's
    ``store.db`` / ``db``): a URL stays a URL, a SQLite file becomes a Path; a Path made of a
    URL must still open PostgreSQL."""
    from gateway.config import load_dashboard_config, load_gateway_config
    from medge.cli import build_parser

    url = new_database(postgres_url)
    parser = build_parser()
    site = ["--site-dir", str(tmp_path)]
    assert parser.parse_args(["gateway", "run", *site, "--db", url]).db == url
    assert parser.parse_args(["dashboard", "--db", url]).db == url
    gw = load_gateway_config(None, {"store.db": url, "site_dir": str(tmp_path)})
    assert gw.store.target() == url
    assert load_dashboard_config(None, {"db": url}).target() == url
    assert load_dashboard_config(None, {"db": "sqlite:///x/gw.sqlite"}).target() == Path(
        "x/gw.sqlite"
    )
    assert load_dashboard_config(None, {}).target() == Path("gateway.sqlite")
    with Store(Path(url)) as store:
        assert store.dialect == "postgresql" and store.schema_version > 0


def test_a_bad_url_is_one_clear_line_without_its_password(postgres_url: str) -> None:
    url = postgres_url.rsplit("/", 1)[0].replace("medge@", "medge:s3cret@") + "/no_such_db"
    with pytest.raises(StoreError) as err:
        Store(url)
    text = str(err.value)
    assert "no_such_db" in text and "s3cret" not in text and "\n" not in text
    assert text.startswith("cannot open PostgreSQL store postgresql://medge:***@")


def _drop_connections(postgres_url: str, url: str) -> None:
    """What a server restart does to the gateway: its connection to ``url`` is gone."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'medge-gateway' AND datname = %s",
            (url.rsplit("/", 1)[1],),
        ).fetchall()
        assert killed == [(True,)]
        deadline = time.monotonic() + 10
        while admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'medge-gateway'"
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, "the backend did not end"
            time.sleep(0.05)


def test_a_lost_connection_is_opened_again(postgres_url: str) -> None:
    """The server drops the gateway's connection (restart, failover, idle timeout): the next
    read and the next transaction run on a new one; nothing stored is lost."""
    from edge_agent.envelope import Envelope

    url = new_database(postgres_url)
    with Store(url) as store:
        assert store.add_result(Envelope("result", SITE, "us-01", 1, 1.0, {"pred": 0}))
        _drop_connections(postgres_url, url)
        assert read_models.result_count(store) == 1, "a read runs again on a new connection"
        _drop_connections(postgres_url, url)
        assert store.add_result(Envelope("result", SITE, "us-01", 2, 2.0, {"pred": 1})), (
            "a transaction begins on a new connection"
        )
        assert not store.add_result(Envelope("result", SITE, "us-01", 2, 2.0, {"pred": 1}))
        assert [r["seq"] for r in store.results()] == [1, 2]

        def lost_midway() -> None:
            with store.transaction() as db:
                db.execute("INSERT INTO audit (time, action) VALUES (?, ?)", (1.0, "first"))
                _drop_connections(postgres_url, url)
                db.execute("INSERT INTO audit (time, action) VALUES (?, ?)", (2.0, "second"))

        with pytest.raises(psycopg.OperationalError):
            lost_midway()
        assert read_models.audit(store) == [], "no half of a transaction on a new connection"
        store.add_audit("after", "the next transaction runs")
        assert [a["action"] for a in read_models.audit(store)] == ["after"]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_two_gateway_workers_store_an_agents_results_once(  # type: ignore[no-untyped-def]
    engine: str,
    bundle_dir: Path,
    tmp_path: Path,
    mosquitto: RunningBroker,
    request: pytest.FixtureRequest,
    identity,
    opener,
) -> None:
    """The agent classifies the 78 BreastMNIST validation images and publishes them sealed;
    two gateway workers on one $share group store them into one database: every image once,
    with the device's prediction, its bundle and its state, on either engine."""
    target = (
        tmp_path / "gw.sqlite"
        if engine == "sqlite"
        else new_database(request.getfixturevalue("postgres_url"))
    )
    workers = [
        Gateway(
            Store(target),
            opener,
            mosquitto.host,
            mosquitto.port,
            client_id=f"gw-{engine}-{i}",
            share_group="store",
        ).start()
        for i in range(2)
    ]
    try:
        cfg = AgentConfig(
            site=SITE,
            device="us-01",
            bundle=bundle_dir,
            identity=identity("us-01"),
            broker={"host": mosquitto.host, "port": mosquitto.port, "protocol": "5"},
            source={"path": breast_cnn.DATA, "split": "val", "rate_hz": 0},
            outbox={"path": tmp_path / "outbox.sqlite", "resend_after_s": 0.5},
            telemetry_interval_s=0.2,
        )
        report = Agent(cfg).run(threading.Event())
        assert (report.sent, report.acked, report.pending) == (78, 78, 0)
        with Store(target) as store:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if read_models.devices(store)[0]["state"] == "offline":
                    break
                time.sleep(0.05)
            rows = read_models.results(store, limit=1000)
            [dev] = read_models.devices(store)
        stored = sum(w.stats.stored for w in workers)
    finally:
        for w in workers:
            w.stop()
            w.store.close()
    assert stored == 78, "the two workers' stores add up to every image, once"
    assert sorted(int(r["input"].rsplit("#", 1)[1]) for r in rows) == list(range(78))
    assert len({r["seq"] for r in rows}) == 78
    import numpy as np

    with np.load(breast_cnn.DATA) as d:
        labels = d["val_labels"].astype(int).ravel()
    assert all(r["label"] == labels[int(r["input"].rsplit("#", 1)[1])] for r in rows)
    assert {r["bundle"] for r in rows} == {Bundle.load(bundle_dir).id}
    assert all(r["pred_label"] in breast_cnn.CLASS_NAMES for r in rows)
    assert (dev["stored"], dev["state"]) == (78, "stopped")
    assert dev["telemetry"]["results"] == 78


def test_a_nul_in_an_authenticated_result_fails_only_its_row(  # type: ignore[no-untyped-def]
    postgres_url: str, sealer, opener, caplog: pytest.LogCaptureFixture
) -> None:
    """A realistic poison that passes the envelope and its schema: JSON allows "\\u0000" in
    a string, PostgreSQL TEXT does not (SQLite does). In one batch with good results of two
    other devices, the device's row is refused (None, one line), the others are stored."""
    from edge_agent.envelope import Envelope

    caplog.set_level("ERROR", logger="medge.gateway.store")
    now = time.time()

    def opened(device: str, seq: int, body: dict[str, object]) -> Envelope:
        return opener.open(sealer(device).seal(Envelope("result", SITE, device, seq, now, body)))

    items = [
        (opened("pg-nul-a", 1, {"pred": 0, "input": "img-1"}), None),
        (opened("pg-nul-b", 1, {"pred": 1, "input": "a\x00b"}), None),
        (opened("pg-nul-c", 1, {"pred": 1, "input": "img-3"}), None),
    ]
    with Store(new_database(postgres_url)) as store:
        assert store.add_results(items, now) == [True, None, True]
        assert {r["device"] for r in store.results()} == {"pg-nul-a", "pg-nul-c"}
        assert store.refused == 1
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and f"{SITE}/pg-nul-b seq 1" in lines[0]


def test_a_server_that_may_lose_commits_is_named_at_open(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The suite's throwaway cluster runs with fsync and synchronous_commit off: a crash of
    that server loses commits it reported done, so results the gateway acknowledged. The
    store says so in one line when it opens (tests/test_chaos_link.py crashes a durable one)."""
    import logging

    with (
        caplog.at_level(logging.WARNING, logger="medge.gateway.store"),
        Store(new_database(postgres_url)) as store,
    ):
        assert store._db.not_durable == ["synchronous_commit=off", "fsync=off"]  # type: ignore[attr-defined]
    said = [r.getMessage() for r in caplog.records if "loses commits" in r.getMessage()]
    assert len(said) == 1 and "synchronous_commit=off, fsync=off" in said[0]
