"""A throwaway PostgreSQL cluster for tests: initdb into a temporary folder, pg_ctl start on
a free loopback port (its unix socket in the same folder), stopped and deleted at the end.

initdb refuses to run as root, so as root the server runs as the unprivileged ``postgres``
user (created by Debian's ``postgresql`` package) through ``runuser``; otherwise as ourselves.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PostgresMissing",
    "PostgresServer",
    "new_database",
    "postgres_bin",
    "require_postgres",
    "start_postgres",
]

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install -y postgresql "
    "(see .ci/run)"
)
SUPERUSER = "medge"


class PostgresMissing(RuntimeError):
    """initdb/pg_ctl are not installed (or, as root, there is no 'postgres' user)."""


@dataclass(frozen=True)
class PostgresServer:
    url: str  # superuser URL of the maintenance database 'postgres'
    host: str
    port: int
    folder: Path
    bin: Path
    options: str = ""  # the server's pg_ctl -o options (its port among them)

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"


def postgres_bin() -> Path:
    """The folder holding initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, or PATH."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    raise PostgresMissing(INSTALL_HINT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runner() -> tuple[list[str], int | None, int | None]:
    """The command prefix that runs a server binary, and the uid/gid to own its files."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresMissing(
            "running as root and there is no 'postgres' user to run the server as: "
            "apt-get install -y postgresql creates it"
        ) from exc
    return ["runuser", "-u", "postgres", "--"], user.pw_uid, user.pw_gid


def require_postgres() -> None:
    """Raise PostgresMissing, saying what to install, unless a cluster can be started here."""
    postgres_bin()
    _runner()


def _run(prefix: list[str], args: list[str], cwd: Path, timeout: float) -> None:
    proc = subprocess.run(
        [*prefix, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )


@contextlib.contextmanager
def start_postgres(timeout: float = 60.0, durable: bool = False) -> Iterator[PostgresServer]:
    """Start a private PostgreSQL server; yields it, stops it and deletes its files at exit.

    The cluster trusts local connections (it listens on 127.0.0.1 and a private socket only)
    and runs with fsync and synchronous commit off: it is thrown away, so durability across a
    power loss is moot. ``durable``: PostgreSQL's own defaults instead, for a test that
    crashes the server (without synchronous commit a crash loses commits it reported done)."""
    bindir = postgres_bin()
    prefix, uid, gid = _runner()
    folder = Path(tempfile.mkdtemp(prefix="medge-pg-"))
    data = folder / "data"
    if uid is not None and gid is not None:
        os.chown(folder, uid, gid)
    started = False
    try:
        _run(
            prefix,
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            folder,
            timeout,
        )
        for attempt in range(3):  # a free port can be taken between probe and bind
            port = _free_port()
            fast = (
                ""
                if durable
                else ("-c fsync=off -c full_page_writes=off -c synchronous_commit=off ")
            )
            options = (
                f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} {fast}"
                "-c shared_buffers=16MB -c max_connections=40"
            )
            try:
                _run(
                    prefix,
                    [
                        str(bindir / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(folder / "server.log"),
                        "-w",
                        "-t",
                        str(int(timeout)),
                        "-o",
                        options,
                        "start",
                    ],
                    folder,
                    timeout + 10,
                )
                started = True
                break
            except RuntimeError:
                if attempt == 2:
                    log = folder / "server.log"
                    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                    raise RuntimeError(f"PostgreSQL did not start; server log:\n{tail}") from None
        host = "127.0.0.1"
        yield PostgresServer(
            url=f"postgresql://{SUPERUSER}@{host}:{port}/postgres",
            host=host,
            port=port,
            folder=folder,
            bin=bindir,
            options=options,
        )
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run(
                    prefix,
                    [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                    folder,
                    60,
                )
        shutil.rmtree(folder, ignore_errors=True)


def restart(server: PostgresServer, down_s: float, timeout: float = 60.0) -> None:
    """Stop the server as a crash would (``-m immediate``), wait ``down_s`` seconds, start it
    again on the same port and data: what a PostgreSQL restart or failover looks like to a
    client (every connection dropped, then refused, then accepted again)."""
    prefix, _, _ = _runner()
    data = server.folder / "data"
    ctl = str(server.bin / "pg_ctl")
    _run(prefix, [ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], server.folder, timeout)
    time.sleep(down_s)
    log = str(server.folder / "server.log")
    start = [ctl, "-D", str(data), "-l", log, "-w", "-o", server.options, "start"]
    _run(prefix, start, server.folder, timeout + 10)


def new_database(server_url: str) -> str:
    """Create an empty database on the server of ``server_url``; returns its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name
