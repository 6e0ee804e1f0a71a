"""The fog node's side of over-the-air bundle updates (docs/device.md): pack a bundle as a
tar.gz, serve it over HTTP, and publish a signed ``update-bundle`` command on the device's
``cmd`` topic. The command format is the agent's (``edge_agent.update``)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import tarfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from edge_agent.bundle import Bundle
from edge_agent.errors import MedgeError
from edge_agent.mqtt_session import MqttSession
from edge_agent.topics import topic
from edge_agent.update import COMMAND_VERSION, sign_command

__all__ = ["BundleServer", "pack_bundle", "publish_command", "update_command"]

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


def update_command(
    key: ed25519.Ed25519PrivateKey, site: str, device: str, url: str, sha256: str,
    allow_downgrade: bool = False,
) -> bytes:
    """A signed update command for one device (``key``: the site's bundle signer);
    ``allow_downgrade``: the device may install a bundle older than the one it runs."""
    body = {
        "v": COMMAND_VERSION,
        "cmd": "update-bundle",
        "site": site,
        "device": device,
        "url": url,
        "sha256": sha256,
        "issued_ms": time.time_ns() // 1_000_000,
    }
    if allow_downgrade:  # only then: an agent that predates the field still takes the rest
        body["allow_downgrade"] = True
    return sign_command(body, key)


def publish_command(
    host: str, port: int, site: str, device: str, payload: bytes, protocol: str = "5",
    timeout: float = 10.0,
) -> None:
    """Publish one command on ``medge/v1/<site>/<device>/cmd`` (QoS 1) and wait for it,
    through an :class:`~edge_agent.mqtt_session.MqttSession` (a broker that is not up yet is
    retried with back-off for ``timeout`` seconds)."""
    with MqttSession("ota", host, port, protocol=protocol, reconnect_max_s=2.0,
                     logger=log) as session:
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
    """Serves the files of one directory over HTTP in a thread. Use as a context manager."""

    def __init__(self, directory: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self._server = http.server.ThreadingHTTPServer((host, port), handler)
        self.host, self.port = host, self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="bundle-server", daemon=True
        )

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/{name}"

    def __enter__(self) -> BundleServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass
