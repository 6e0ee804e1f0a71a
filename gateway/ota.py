"""The fog node's side of over-the-air bundle updates (docs/device.md): pack a bundle as a
tar.gz, serve it over HTTP, and publish a signed ``update-bundle`` command on the device's
``cmd`` topic. The command format is the agent's (``edge_agent.update``). :func:`push_bundle`
does all three for ``medge gateway push-bundle``."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import socket
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.bundle import Bundle
from edge_agent.commands import COMMAND_VERSION, sign_command
from edge_agent.errors import MedgeError
from edge_agent.mqtt_session import MqttSession
from edge_agent.topics import topic

__all__ = [
    "BundleServer",
    "address_toward",
    "command",
    "issued_ms",
    "pack_bundle",
    "publish_command",
    "push_bundle",
    "update_command",
]

log = logging.getLogger("medge.gateway.ota")


def pack_bundle(bundle_dir: Path, out_dir: Path) -> tuple[Path, str]:
    """``<name>-<manifest hash>.tar.gz`` of the bundle's files (at the archive's root), and
    its SHA-256. The bundle is verified first (hashes, schema): never ship a broken one."""
    bundle = Bundle.load(bundle_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{bundle.manifest.name}-{bundle.manifest_sha256[:12]}.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        for p in sorted(Path(bundle_dir).iterdir()):
            tar.add(p, arcname=p.name, recursive=False)
    return out, hashlib.sha256(out.read_bytes()).hexdigest()


class _Issued:
    """``issued_ms`` of commands: the time in ms, strictly increasing within this process."""

    def __init__(self) -> None:
        self._lock, self._last = threading.Lock(), 0

    def __call__(self) -> int:
        with self._lock:
            self._last = max(time.time_ns() // 1_000_000, self._last + 1)
            return self._last


issued_ms = _Issued()
"""A command's ``issued_ms``: a device refuses a command not newer than the last it took, so
two commands sent within one millisecond must still differ."""


def command(
    key: ed25519.Ed25519PrivateKey,
    site: str,
    device: str,
    cmd: str,
    issued: int | None = None,
    **fields: Any,
) -> bytes:
    """A signed command for one device (``key``: the site's bundle signer): ``update-bundle``
    and ``shadow-bundle`` (url, sha256; share, cpu_budget), ``shadow-stop``,
    ``rollback-bundle`` (to); the agent's :mod:`edge_agent.update` says what each does.
    ``issued``: its ``issued_ms`` (default :data:`issued_ms`); fields that are None are left
    out."""
    body = {
        "v": COMMAND_VERSION,
        "cmd": cmd,
        "site": site,
        "device": device,
        "issued_ms": issued if issued is not None else issued_ms(),
        **{k: v for k, v in fields.items() if v is not None},
    }
    return sign_command(body, key)


def update_command(
    key: ed25519.Ed25519PrivateKey,
    site: str,
    device: str,
    url: str,
    sha256: str,
    allow_downgrade: bool = False,
) -> bytes:
    """A signed update command for one device (``key``: the site's bundle signer);
    ``allow_downgrade``: the device may install a bundle older than the one it runs (only
    then is the field sent: an agent that predates it still takes the rest)."""
    allow = True if allow_downgrade else None
    return command(
        key, site, device, "update-bundle", url=url, sha256=sha256, allow_downgrade=allow
    )


def publish_command(
    host: str,
    port: int,
    site: str,
    device: str,
    payload: bytes,
    protocol: str = "5",
    timeout: float = 10.0,
    tls: tuple[Path, Path, Path] | None = None,
) -> None:
    """Publish one command on ``medge/v1/<site>/<device>/cmd`` (QoS 1) and wait for it,
    through an :class:`~edge_agent.mqtt_session.MqttSession` (a broker that is not up yet is
    retried with back-off for ``timeout`` seconds); ``tls``: (ca, cert, key) of a client the
    site broker lets publish commands (the gateway's)."""
    with MqttSession(
        "ota", host, port, protocol=protocol, reconnect_max_s=2.0, tls=tls, logger=log
    ) as session:
        if not session.wait_connected(timeout):
            raise MedgeError(f"cannot reach the broker at {host}:{port}")
        info = session.publish(topic(site, device, "cmd"), payload, qos=1)
        try:
            info.wait_for_publish(timeout=timeout)
        except RuntimeError as exc:  # paho: the connection was lost before it went
            raise MedgeError(f"command to {site}/{device} was not published: {exc}") from exc
        if not info.is_published():
            raise MedgeError(f"command to {site}/{device} was not published")


class BundleServer:
    """Serves the files of one directory over HTTP in a thread. Use as a context manager.
    ``url_host``: the name devices reach this machine by, in :meth:`url` (default ``host``)."""

    def __init__(
        self, directory: Path, host: str = "127.0.0.1", port: int = 0, url_host: str | None = None
    ) -> None:
        self._fetched: dict[str, int] = {}
        self._cond = threading.Condition()
        handler = functools.partial(
            _QuietHandler, directory=str(directory), on_fetched=self._on_fetched
        )
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self.host, self.port = host, self._server.server_address[1]
        self.url_host = url_host or host
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bundle-server", daemon=True
        )

    def url(self, name: str) -> str:
        shown = f"[{self.url_host}]" if ":" in self.url_host else self.url_host
        return f"http://{shown}:{self.port}/{name}"

    def _on_fetched(self, path: str) -> None:
        with self._cond:
            name = path.split("?", 1)[0].lstrip("/")
            self._fetched[name] = self._fetched.get(name, 0) + 1
            self._cond.notify_all()

    def fetched(self, name: str) -> int:
        """How many times ``name`` was served in full."""
        with self._cond:
            return self._fetched.get(name, 0)

    def wait_fetched(self, name: str, timeout: float) -> bool:
        """Wait until ``name`` has been served in full once; False after ``timeout`` s."""
        with self._cond:
            return self._cond.wait_for(lambda: self._fetched.get(name, 0) > 0, timeout)

    def __enter__(self) -> BundleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def __init__(
        self, *args: Any, on_fetched: Callable[[str], None] | None = None, **kwargs: Any
    ) -> None:
        self._on_fetched, self._status = on_fetched, 0
        super().__init__(*args, **kwargs)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._status = code
        super().send_response(code, message)

    def do_GET(self) -> None:
        super().do_GET()  # the whole file is written before this returns
        if self._status == 200 and self._on_fetched is not None:
            self._on_fetched(self.path)

    def log_message(self, format: str, *args: object) -> None:
        pass


def address_toward(host: str, port: int) -> str:
    """This machine's address on the route to ``host`` (no packet is sent)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


def push_bundle(
    bundle: Path,
    site_dir: Path,
    host: str,
    port: int,
    device: str,
    protocol: str = "5",
    tls: bool = False,
    allow_downgrade: bool = False,
    http_host: str = "0.0.0.0",  # noqa: S104
    http_port: int = 0,
    url_host: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Verify and pack ``bundle``, serve it, publish a signed update command to ``device`` of
    the site in ``site_dir`` (its bundle signer signs), and return once the device has
    fetched the archive (MedgeError after ``timeout`` s). What the device then does (verify,
    self-test, swap, or refuse) it reports in its ``update`` event."""
    from gateway.site import signer_key, site_name

    site = site_name(site_dir)
    key = signer_key(site_dir)
    files = None
    if tls:
        from gateway.broker_config import gateway_client_files

        files = gateway_client_files(site_dir)
    with tempfile.TemporaryDirectory(prefix="medge-ota-") as tmp:
        archive, digest = pack_bundle(bundle, Path(tmp))
        shown = url_host or (
            http_host
            if http_host not in ("0.0.0.0", "::", "")  # noqa: S104
            else address_toward(host, port)
        )
        with BundleServer(Path(tmp), http_host, http_port, url_host=shown) as server:
            url = server.url(archive.name)
            cmd = update_command(key, site, device, url, digest, allow_downgrade=allow_downgrade)
            publish_command(host, port, site, device, cmd, protocol=protocol, tls=files)
            log.info("update command for %s/%s published; serving %s", site, device, url)
            if not server.wait_fetched(archive.name, timeout):
                raise MedgeError(
                    f"{site}/{device} did not fetch {url} within {timeout:g} s "
                    "(is it online, and can it reach this address? --url-host)"
                )
    return {
        "site": site,
        "device": device,
        "url": url,
        "sha256": digest,
        "archive": archive.name,
        "allow_downgrade": allow_downgrade,
    }
