"""``medge agent package``: one self-contained directory (and .tar.gz) that installs the edge
agent on a device with no network: wheels, the signed bundle, the config, the identity, a
systemd unit and ``install.sh``. See docs/device.md.

    medge-agent-<device>/
      wheels/               medge (built from this source tree) + its ``device`` dependencies
      bundle/<name>/        the signed bundle, verified against the identity before packing
      identity/             from 'medge device provision'; device.key stays mode 0600
      agent.yaml            the agent config, validated; bundle/identity/outbox relative to it
      medge-agent.service   systemd unit (install.sh fills in the paths)
      install.sh            venv from the shipped wheels only, files, user, unit
      package.json          what is inside: device, bundle id, wheels with their SHA-256
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_agent.errors import MedgeError
from medge.package_files import INSTALL_SH, SYSTEMD_UNIT

__all__ = ["FORBIDDEN", "PackageReport", "build_package", "default_wheel_cache"]

log = logging.getLogger("medge.package")
_PY = f"{sys.version_info.major}.{sys.version_info.minor}"

# Never on a device (DESIGN.md): a wheel whose project name matches is a packaging bug.
FORBIDDEN = re.compile(r"^(tensorflow|tf[-_]keras|keras|tensorboard|tflite[-_]model[-_]maker)")
_SOURCES = ("edge_agent", "converter", "gateway", "models", "medge")


def default_wheel_cache() -> Path:
    """Where downloaded wheels are kept between builds ($MEDGE_WHEEL_CACHE overrides)."""
    env = os.environ.get("MEDGE_WHEEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "medge-wheels"


@dataclass
class PackageReport:
    directory: Path
    tarball: Path | None
    device: str
    bundle: str
    wheels: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "tarball": str(self.tarball) if self.tarball else None,
            "device": self.device,
            "bundle": self.bundle,
            "wheels": sorted(self.wheels),
        }


def build_package(
    config: Path,
    out: Path,
    *,
    platforms: list[str] | None = None,
    python_version: str | None = None,
    wheel_cache: Path | None = None,
    source_tree: Path | None = None,
    tarball: bool = True,
) -> PackageReport:
    """Build the device package for the agent config ``config`` into ``out``."""
    from edge_agent.bundle import Bundle
    from edge_agent.config import AgentConfig, load_config
    from edge_agent.identity import DeviceIdentity

    cfg = load_config(config)
    ident = DeviceIdentity.load(cfg.identity, cfg.site, cfg.device)
    bundle = Bundle.load(cfg.bundle, trusted=ident.signers)  # exactly as the device will
    if out.exists() and any(out.iterdir()):
        raise MedgeError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    name = bundle.directory.resolve().name
    shutil.copytree(bundle.directory, out / "bundle" / name)
    shutil.copytree(cfg.identity, out / "identity")
    for p in (out / "identity").rglob("*"):  # copytree keeps modes; make sure of the key
        if p.name.endswith(".key"):
            p.chmod(0o600)
    (out / "identity").chmod(0o700)

    data = cfg.model_dump(mode="json")
    data.update(bundle=f"bundle/{name}", identity="identity")
    data["outbox"]["path"] = "outbox.sqlite"
    AgentConfig.model_validate(data)  # the agent's own model: what we ship, it accepts
    header = f"# medge agent config for {cfg.site}/{cfg.device}; paths relative to this file\n"
    (out / "agent.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))

    wheels = out / "wheels"
    wheels.mkdir()
    _own_wheel(source_tree or Path(__file__).resolve().parents[1], wheels)
    _device_wheels(wheels, platforms or [], python_version, wheel_cache or default_wheel_cache())
    hashes = {w.name: _sha256(w) for w in sorted(wheels.glob("*.whl"))}
    bad = [w for w in hashes if FORBIDDEN.match(w.lower())]
    if bad:
        raise MedgeError(f"device package would contain {', '.join(bad)}: never on a device")

    (out / "medge-agent.service").write_text(SYSTEMD_UNIT)
    (out / "install.sh").write_text(INSTALL_SH)
    (out / "install.sh").chmod(0o755)
    (out / "package.json").write_text(
        json.dumps(
            {
                "site": cfg.site,
                "device": cfg.device,
                "bundle": bundle.id,
                "bundle_dir": f"bundle/{name}",
                "platforms": platforms or ["native"],
                "python_version": python_version or _PY,
                "wheels": hashes,
            },
            indent=2,
        )
        + "\n"
    )
    tar = _tarball(out) if tarball else None
    return PackageReport(out, tar, cfg.device, bundle.id, hashes)


def _own_wheel(tree: Path, wheels: Path) -> None:
    """medge's wheel from the source tree, built in a scratch copy (the tree stays clean)."""
    with tempfile.TemporaryDirectory(prefix="medge-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for f in ("pyproject.toml", "README.md", "NOTICE"):
            if (tree / f).exists():
                shutil.copy2(tree / f, src / f)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for pkg in _SOURCES:
            shutil.copytree(tree / pkg, src / pkg, ignore=ignore)
        _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src))


def _device_requirements(wheels: Path) -> list[str]:
    """Requires-Dist of medge's wheel for the ``device`` extra, marker ``extra`` removed."""
    import zipfile

    (whl,) = wheels.glob("medge-*.whl")
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = []
    for line in lines:
        if not line.startswith("Requires-Dist:") or 'extra == "device"' not in line:
            continue
        req = line.split(":", 1)[1].strip()
        req = re.sub(r'\s*(and\s+)?extra == "device"', "", req).strip()
        req = re.sub(r"\(\s*(.*?)\s*\)\s*;", r"\1 ;", req)  # 'x; (m)' -> 'x; m'
        reqs.append(req.rstrip(";").strip())
    if not reqs:
        raise MedgeError(f"{whl.name}: declares no 'device' extra")
    return reqs


def _device_wheels(
    wheels: Path, platforms: list[str], python_version: str | None, cache: Path
) -> None:
    """Binary wheels of the device dependencies for the target, through a reusable cache:
    offline from the cache first, from the index only when something is missing."""
    reqs = _device_requirements(wheels)
    cache.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:"]
    for plat in platforms:
        target += ["--platform", plat]
    if python_version or platforms:
        target += ["--python-version", python_version or _PY]
        target += ["--implementation", "cp"]
    base = ["download", "-q", "-d", str(wheels), "--find-links", str(cache), *target, *reqs]
    try:
        _pip(*base[:1], "--no-index", *base[1:])
    except MedgeError:
        log.info("wheel cache %s is missing some wheels; downloading", cache)
        _pip(*base)
        for w in wheels.glob("*.whl"):
            if not (cache / w.name).exists() and not w.name.startswith("medge-"):
                shutil.copy2(w, cache / w.name)


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise MedgeError(f"pip {args[0]} failed: {' / '.join(tail)}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tarball(directory: Path) -> Path:
    """``<dir>.tar.gz`` beside it; file modes (the 0600 key) are kept, owners are not."""
    out = directory.with_name(directory.name + ".tar.gz")

    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        return info

    with tarfile.open(out, "w:gz", compresslevel=1) as tar:  # wheels are already compressed
        tar.add(directory, arcname=directory.name, filter=anonymous)
    return out
