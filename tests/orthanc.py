"""A throwaway Orthanc PACS for tests: Debian's ``/usr/sbin/Orthanc`` with its DICOMweb plug-in,
on free loopback HTTP and DICOM ports, storage in a temporary folder, a JSON configuration
written here, HTTP basic auth with a user and password generated for this run. Stopped (and
its folder removed) at the end.

``orthanc`` is a module-scoped pytest fixture; a test module imports it
(``from orthanc import orthanc``) to use it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["DICOMWEB_PLUGIN", "ORTHANC", "OrthancServer", "orthanc", "start_orthanc"]

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL_HINT = "Orthanc not found: apt-get install -y orthanc orthanc-dicomweb"
AE_TITLE = "ORTHANC"
USER = "medge-test"


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    user: str
    password: str
    password_file: Path  # the password alone, as a deployment keeps it
    folder: Path
    process: subprocess.Popen[bytes]
    ae_title: str = AE_TITLE

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def rest(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """One call to Orthanc's own REST API (what a modality's upload goes through)."""
        req = urllib.request.Request(self.url + path, data=body, method=method)  # noqa: S310
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        if body is not None:
            req.add_header("Content-Type", "application/dicom")
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310 (http, loopback)
            return bytes(r.read())

    def upload(self, path: Path) -> dict[str, str]:
        """POST one DICOM file to /instances; Orthanc's answer (ID, Status, ...)."""
        out: dict[str, str] = json.loads(self.rest("POST", "/instances", path.read_bytes()))
        return out

    def restart(self, timeout: float = 20.0) -> OrthancServer:
        """A new Orthanc on the same ports, folder (its stored instances) and password, once
        this one has stopped."""
        self.stop()
        return start_orthanc(
            self.folder, timeout, ports=(self.http_port, self.dicom_port), password=self.password
        )

    def pacs_fields(self, timeout_s: float = 5.0) -> dict[str, object]:
        """How a PacsConfig / PacsSettings reaches this Orthanc (DICOMweb, DIMSE, the user)."""
        return {
            "url": self.dicomweb_url,
            "host": "127.0.0.1",
            "port": self.dicom_port,
            "called_ae": self.ae_title,
            "user": self.user,
            "password_file": self.password_file,
            "timeout_s": timeout_s,
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(folder: Path, http_port: int, dicom_port: int, password: str) -> dict[str, object]:
    return {
        "Name": "medge-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": AE_TITLE,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomModalities": {},
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: password},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
        "HttpTimeout": 10,
        "StorageCompression": False,
        "LuaScripts": [],
    }


def start_orthanc(
    folder: Path,
    timeout: float = 20.0,
    ports: tuple[int, int] | None = None,
    password: str | None = None,
) -> OrthancServer:
    """Start Orthanc in ``folder`` and wait until its REST API and DICOMweb answer; on free
    ports with a new password unless ``ports`` (HTTP, DICOM) and ``password`` are given.
    Free ports found here may be taken by another process (another pytest worker) before
    Orthanc binds them: then it exits, and new ones are tried (3 times in all)."""
    if not ORTHANC.is_file() or not DICOMWEB_PLUGIN.is_file():
        raise RuntimeError(INSTALL_HINT)
    if ports is not None:
        return _start_orthanc(folder, timeout, ports, password)
    for attempt in range(3):
        try:
            return _start_orthanc(folder, timeout, (_free_port(), _free_port()), password)
        except OrthancExited:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class OrthancExited(RuntimeError):
    """Orthanc ended before it answered (a port it was given was taken, a bad config)."""


def _start_orthanc(
    folder: Path, timeout: float, ports: tuple[int, int], password: str | None
) -> OrthancServer:
    http_port, dicom_port = ports
    password = password if password is not None else secrets.token_urlsafe(18)
    config = folder / "orthanc.json"
    config.write_text(json.dumps(_config(folder, http_port, dicom_port, password), indent=2))
    pw_file = folder / "pacs-password"
    pw_file.write_text(password + "\n")
    pw_file.chmod(0o600)
    log = (folder / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        [str(ORTHANC), "--logdir=" + str(folder), str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    server = OrthancServer(http_port, dicom_port, USER, password, pw_file, folder, proc)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = "".join(
                (folder / "orthanc.log").read_text(errors="replace").splitlines(True)[-20:]
            )
            raise OrthancExited(f"Orthanc exited with {proc.returncode}:\n{tail}")
        try:
            server.rest("GET", "/system")
            server.rest("GET", "/dicom-web/studies")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"Orthanc did not answer within {timeout:.0f} s") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def orthanc() -> Iterator[OrthancServer]:
    """A running Orthanc for the module, with no data (fails, saying what to install, when
    Orthanc or its DICOMweb plug-in is missing)."""
    folder = Path(tempfile.mkdtemp(prefix="medge-orthanc-"))
    server = start_orthanc(folder)
    try:
        yield server
    finally:
        server.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
