"""``medge agent package``: one self-contained directory (and .tar.gz) that installs the edge
agent on a device with no network: wheels, the signed bundle, the config, the identity, a
systemd unit and ``install.sh``. See docs/device.md.

    medge-agent-<device>/
      wheels/               medge (built from this source tree) + the dependencies of the
                            extras its config needs (:func:`device_extras`): ``device``, the
                            LiteRT core, plus ``device-video``/``device-onnx``/... only if used
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

__all__ = [
    "DEVICE_EXTRAS",
    "FORBIDDEN",
    "PackageReport",
    "build_package",
    "default_wheel_cache",
    "device_extras",
    "shipped_config",
]

log = logging.getLogger("medge.package")
_PY = f"{sys.version_info.major}.{sys.version_info.minor}"

# Never on a device (DESIGN.md): a wheel whose project name matches is a packaging bug.
FORBIDDEN = re.compile(r"^(tensorflow|tf[-_]keras|keras|tensorboard|tflite[-_]model[-_]maker)")
_SOURCES = ("edge_agent", "converter", "gateway", "models", "medge")

# The extras a device package may ship (pyproject.toml); `device` is always one of them.
DEVICE_EXTRAS = ("device", "device-video", "device-onnx", "device-dicom", "device-full", "serial")
# source kinds that need more than the core: OpenCV decodes video and image files, pydicom
# reads DICOM (its JPEG frames go through OpenCV: add device-video with ``extras=``), pyserial
_SOURCE_EXTRAS = {
    "video": "device-video",
    "images": "device-video",
    "dicom": "device-dicom",
    "serial": "serial",
}


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
    extras: list[str] = field(default_factory=lambda: ["device"])

    def to_json(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory),
            "tarball": str(self.tarball) if self.tarball else None,
            "device": self.device,
            "bundle": self.bundle,
            "extras": self.extras,
            "wheels": sorted(self.wheels),
        }


def device_extras(cfg: Any, more: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The extras an agent config needs: ``device`` (LiteRT, numpy, MQTT, crypto, config),
    ``device-video`` for a video or image-folder source, ``device-dicom`` for DICOM (with
    ``device-video`` when it resizes), ``serial`` for a serial sensor, ``device-onnx`` for
    ``runtime: onnx``; plus ``more``, which must name device extras."""
    extras = ["device"]
    kind = str(getattr(cfg.source, "kind", "npz"))
    if kind in _SOURCE_EXTRAS:
        extras.append(_SOURCE_EXTRAS[kind])
    if kind == "dicom" and cfg.source.size is not None:  # resizing goes through OpenCV
        extras.append("device-video")
    if cfg.runtime == "onnx":
        extras.append("device-onnx")
    for extra in more:
        name = re.sub(r"[-_.]+", "-", extra).lower()
        if name not in DEVICE_EXTRAS:
            raise MedgeError(f"extra {extra!r} is not a device extra ({', '.join(DEVICE_EXTRAS)})")
        extras.append(name)
    return list(dict.fromkeys(extras))  # in order, once each


def build_package(
    config: Path,
    out: Path,
    *,
    platforms: list[str] | None = None,
    python_version: str | None = None,
    wheel_cache: Path | None = None,
    source_tree: Path | None = None,
    tarball: bool = True,
    extras: list[str] | tuple[str, ...] = (),
) -> PackageReport:
    """Build the device package for the agent config ``config`` into ``out``: wheels of the
    extras the config needs (:func:`device_extras`) and of ``extras`` on top (e.g.
    ``["device-video"]`` for JPEG-compressed DICOM)."""
    from edge_agent.bundle import Bundle
    from edge_agent.config import AgentConfig, load_config
    from edge_agent.identity import DeviceIdentity

    cfg = load_config(config)
    chosen = device_extras(cfg, extras)
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

    data = shipped_config(cfg, f"bundle/{name}")
    AgentConfig.model_validate(data)  # the agent's own model: what we ship, it accepts
    _tell_window(cfg, bundle)
    header = f"# medge agent config for {cfg.site}/{cfg.device}; paths relative to this file\n"
    (out / "agent.yaml").write_text(header + yaml.safe_dump(data, sort_keys=False))

    wheels = out / "wheels"
    wheels.mkdir()
    _own_wheel(source_tree or Path(__file__).resolve().parents[1], wheels)
    cache = wheel_cache or default_wheel_cache()
    _device_wheels(wheels, chosen, platforms or [], python_version, cache)
    hashes = {w.name: _sha256(w) for w in sorted(wheels.glob("*.whl"))}
    bad = [w for w in hashes if FORBIDDEN.match(w.lower())]
    if bad:
        raise MedgeError(f"device package would contain {', '.join(bad)}: never on a device")

    (out / "medge-agent.service").write_text(SYSTEMD_UNIT)
    (out / "install.sh").write_text(INSTALL_SH.replace("@EXTRAS@", ",".join(chosen)))
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
                "extras": chosen,
                "wheels": hashes,
            },
            indent=2,
        )
        + "\n"
    )
    tar = _tarball(out) if tarball else None
    log.info("device package %s: medge[%s], %d wheels", out, ",".join(chosen), len(hashes))
    return PackageReport(out, tar, cfg.device, bundle.id, hashes, chosen)


def shipped_config(cfg: Any, bundle: str) -> dict[str, Any]:
    """The config as the package writes it: only the settings the user's YAML sets (never a
    default written back, which would pin it over the bundle's window), with the bundle,
    identity and outbox paths relative to the package."""
    data: dict[str, Any] = cfg.model_dump(mode="json", exclude_unset=True)
    data.update(bundle=bundle, identity="identity")
    data.setdefault("outbox", {})["path"] = "outbox.sqlite"  # install.sh rewrites it
    return data


def _tell_window(cfg: Any, bundle: Any) -> None:
    """Log the window the packaged agent will use; a config override is a warning line."""
    from edge_agent.sources import window_plan
    from edge_agent.window import warn_overrides

    plan = window_plan(cfg.source, bundle.manifest.window)
    if plan:
        log.info("window: %s", ", ".join(s.describe() for s in plan))
    warn_overrides(f"{cfg.site}/{cfg.device} package", plan)


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


def _device_requirements(wheels: Path, extras: list[str]) -> list[str]:
    """Requires-Dist of medge's wheel for ``extras``, the ``extra`` marker removed and
    ``medge[...]`` self-references expanded (``device-video`` = ``device`` + OpenCV)."""
    import zipfile

    (whl,) = wheels.glob("medge-*.whl")
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    by_extra: dict[str, list[str]] = {}
    for line in lines:
        m = re.match(r"Requires-Dist:\s*(.*?)\s*;(.*)\bextra\s*==\s*\"([^\"]+)\"", line)
        if not m:
            continue
        req, marker, extra = m.groups()
        marker = re.sub(r"\s*\band\s*$", "", marker.strip()).strip()
        marker = re.sub(r"^\((.*)\)$", r"\1", marker)  # '(m) and extra' -> 'm'
        by_extra.setdefault(extra, []).append(f"{req}; {marker}" if marker else req)
    reqs: list[str] = []
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in by_extra:
            raise MedgeError(f"{whl.name}: declares no {extra!r} extra")
        for req in by_extra[extra]:
            own = re.fullmatch(r"medge\[([^\]]+)\]", req)
            if own:
                todo += [e.strip() for e in own.group(1).split(",")]
            elif req not in reqs:
                reqs.append(req)
    return reqs


def _device_wheels(
    wheels: Path, extras: list[str], platforms: list[str], python_version: str | None, cache: Path
) -> None:
    """Binary wheels of the dependencies of ``extras`` for the target, through a reusable
    cache: offline from the cache first, from the index only when something is missing."""
    reqs = _device_requirements(wheels, extras)
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
