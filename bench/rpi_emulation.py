"""Does the agent package for a Raspberry Pi (arm64) really run there? Checked under QEMU
user-mode emulation, and compared with the same inputs on this (x86) machine.

    python bench/rpi_emulation.py [--work DIR] [--board rpi4|rpi5] [--model breast_cnn|ecg_gru]
                                  [--limit N] [--no-agent] [--no-artefact-check] [--qemu-cpu CPU]

Needs root (chroot, mounts), ``qemu-user-static`` and ``debootstrap`` (Debian packages), and
the network the first time (Debian arm64 packages, aarch64 wheels from PyPI); everything is
kept under ``--work`` (default ~/.cache/medge-rpi) and reused. docs/rpi-emulation.md.

1. an arm64 Debian bookworm root (``debootstrap --foreign`` and ``dpkg-deb -x`` of its
   .debs: no second stage, binfmt_misc is not needed) with ``qemu-aarch64-static`` in it;
2. a throwaway site, two device identities, the zoo bundle of ``--model`` (``--profile
   rpi4``) built on x86 by the converter and signed: the breast CNN on its evaluation images,
   or the ECG beat classifier on record 106 (the demo's stretch), whose PVC runs are events;
3. the agent package for aarch64 / CPython 3.11 from medge's own :func:`build_package`;
4. install.sh's two steps in the root, under qemu: a venv, then ``pip install --no-index
   --find-links wheels 'medge[<extras>]'`` (install.sh itself cannot run: without binfmt_misc
   every exec of an arm64 program would need qemu in front of it);
5. the installed agent's own source plug-in, :class:`~edge_agent.model.LoadedModel` and
   event tracker on the first ``--limit`` windows, in the root (arm64) and here (x86):
   predictions, scores and events compared;
6. unless ``--no-agent``: the installed agent (``medge agent run``, arm64) and the same agent
   here (x86) publish the same windows through Mosquitto to a gateway in this process; the
   stored results and events of both devices are compared;
7. the artefact check: the arm64 inference again with this machine's own /proc/cpuinfo
   visible (an x86 one), which is what ``qemu-aarch64-static -L ROOT`` gives a program: there
   ai-edge-litert 2.3 segfaults creating its interpreter (cpuinfo/XNNPACK reading an x86
   machine description); with a Pi's it runs. An emulation artefact: docs/rpi-emulation.md.

The emulated CPU is chosen by ``--board`` (QEMU_CPU cortex-a72 for a Pi 4, cortex-a76 for a
Pi 5) and the emulated program sees a Pi's /proc/cpuinfo (bind-mounted over the real one).
``--qemu-cpu max`` is a diagnosis, not a board: its SME path gives wrong int8 results.
Emulated timings are NOT performance figures: none is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SUITE = "bookworm"  # Raspberry Pi OS (64-bit) is Debian bookworm: CPython 3.11
MIRROR = "http://deb.debian.org/debian"
PY = "3.11"
PLATFORMS = [
    "manylinux2014_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux_2_28_aarch64",
]
QEMU = "/usr/bin/qemu-aarch64-static"
VENV = "/opt/medge-agent/venv"
NOT_TIMINGS = (
    "emulated run: qemu user-mode timings are NOT performance figures and none is reported; "
    "measure on a real board"
)


def _cpuinfo(features: str, part: str, rev: int, tail: str, n: int) -> str:
    one = (
        "processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {p}\nCPU revision\t: {r}\n\n"
    )
    return "".join(one.format(i=i, f=features, p=part, r=rev) for i in range(n)) + tail


# board -> (QEMU_CPU, the Features/CPU part lines of the board's own /proc/cpuinfo)
BOARDS: dict[str, tuple[str, str, str, int, str]] = {
    "rpi4": (
        "cortex-a72",
        "fp asimd evtstrm crc32 cpuid",
        "0xd08",
        3,
        "Hardware\t: BCM2835\nRevision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n",
    ),
    "rpi5": (
        "cortex-a76",
        "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc "
        "dcpop asimddp",
        "0xd0b",
        1,
        "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n",
    ),
}

# run by both interpreters: the installed agent's own source, model and event tracker on the
# same windows (argv: bundle, the agent's `source:` section as JSON)
INFER = r"""
import json, platform, sys, threading
from importlib.metadata import version
from edge_agent.bundle import Bundle
from edge_agent.config import AgentConfig
from edge_agent.events import EventTracker
from edge_agent.model import LoadedModel
from edge_agent.sources import open_source
bundle = Bundle.load(sys.argv[1])
man = bundle.manifest
cfg = AgentConfig.model_validate({"site": "s", "device": "d", "bundle": ".", "identity": ".",
                                  "source": json.loads(sys.argv[2])})
model = LoadedModel(bundle, "litert", threads=1)
tracker = EventTracker(man.decode.events, man.labels)
out, events = [], []
for w in open_source(cfg.source, man.window, man.labels).stream(threading.Event()):
    scores = model.infer(model.prepare(w.data))
    d = model.decode(scores)
    out.append({"pred": int(d.pred), "label": d.pred_label, "scores": [float(s) for s in d.scores]})
    events += tracker.update(float(w.time or 0), scores, w.id)
events += tracker.finish()
print(json.dumps({"machine": platform.machine(), "litert": version("ai-edge-litert"),
                  "numpy": version("numpy"), "results": out, "events": events}, default=str))
"""


def log(msg: str) -> None:
    print(f"[rpi-emulation] {msg}", file=sys.stderr, flush=True)


def sh(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, text=True, capture_output=True, check=False, **kw)


def must(cmd: list[str], **kw: Any) -> str:
    done = sh(cmd, **kw)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{tail}")
    return done.stdout


CPU_OVERRIDE: dict[str, str] = {}  # --qemu-cpu


def guest_env(board: str) -> dict[str, str]:
    """The environment of an emulated program: no pip settings of this machine's, the CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    cpu = CPU_OVERRIDE.get("cpu", BOARDS[board][0])
    env.update(QEMU_CPU=cpu, HOME="/root", LC_ALL="C.UTF-8")
    return env


def build_root(work: Path) -> Path:
    root = work / "root"
    if not (root / "usr/bin/python3.11").exists():
        for tool in ("debootstrap", "dpkg-deb", "chroot"):
            if not shutil.which(tool):
                raise SystemExit(f"{tool} is missing: apt-get install -y debootstrap")
        log(f"debootstrap --foreign arm64 {SUITE} into {root} (network)")
        must(
            [
                "debootstrap",
                "--foreign",
                "--arch",
                "arm64",
                "--variant=minbase",
                "--include=python3,python3-venv",
                SUITE,
                str(root),
                MIRROR,
            ]
        )
        for deb in sorted((root / "var/cache/apt/archives").glob("*.deb")):
            must(["dpkg-deb", "-x", str(deb), str(root)])  # no second stage: no binfmt_misc
    if not Path(QEMU).exists():
        raise SystemExit(f"{QEMU} is missing: apt-get install -y qemu-user-static")
    shutil.copy2(QEMU, root / "usr/bin/qemu-aarch64-static")
    return root


@contextlib.contextmanager
def mounted(root: Path, cpuinfo: Path | None) -> Iterator[None]:
    """/dev, /sys and /proc in the root; /proc/cpuinfo replaced by ``cpuinfo`` if given."""
    done: list[Path] = []
    try:
        for what, args in (
            ("dev", ["--bind", "/dev"]),
            ("sys", ["--bind", "/sys"]),
            ("proc", ["-t", "proc", "proc"]),
        ):
            target = root / what
            target.mkdir(exist_ok=True)
            must(["mount", *args, str(target)])
            done.append(target)
        if cpuinfo is not None:
            must(["mount", "--bind", str(cpuinfo), str(root / "proc/cpuinfo")])
            done.append(root / "proc/cpuinfo")
        yield
    finally:
        for target in reversed(done):
            sh(["umount", str(target)])


def guest(root: Path, *argv: str) -> list[str]:
    """``argv`` run in the root under qemu (an arm64 program: no binfmt_misc needed)."""
    return ["chroot", str(root), "/usr/bin/qemu-aarch64-static", *argv]


def _breast_data(out: Path) -> dict[str, Any]:
    import numpy as np

    from models import breast_cnn

    with np.load(breast_cnn.DATA) as d:  # the evaluation images only
        np.savez(out, val_images=d["val_images"], val_labels=d["val_labels"])
    return {"path": str(out), "split": "val", "rate_hz": 0}


def _ecg_data(out: Path) -> dict[str, Any]:
    from medge.demo_scenarios import scenario

    src = scenario("ecg").source(0.0, None)  # record 106's last 5 min, as the demo plays it
    shutil.copy2(src["path"], out)
    return {"kind": "ecg", "path": str(out), "realtime": False, "loop": False}


# --model: zoo name -> the input file's name and the agent's `source:` for it (with "limit")
MODELS = {"breast_cnn": ("breast_val.npz", _breast_data), "ecg_gru": ("ecg_106.npz", _ecg_data)}


def make_site(work: Path, model: str, limit: int) -> tuple[Path, dict[str, Path], Path, dict]:
    """Site, identities of an arm64 and an x86 device, the signed bundle, the source."""
    from gateway.site import init_site, provision_device

    site = work / "site" / "ward-emu"
    if not (site / "bundle-signer.key").exists():
        shutil.rmtree(site, ignore_errors=True)
        site.parent.mkdir(parents=True, exist_ok=True)
        init_site(site, "ward-emu")
    ids = {}
    for dev in ("rpi-arm64", "rpi-x86"):
        out = work / "identities" / dev
        if not out.exists():
            provision_device(site, dev, out)
        ids[dev] = out
    bundle = work / "bundle" / f"{model}-rpi4"
    if not (bundle / "manifest.json").exists():
        log(f"medge zoo build {model} --profile rpi4 (x86, the converter)")
        medge = str(REPO / ".venv/bin/medge") if (REPO / ".venv/bin/medge").exists() else "medge"
        cmd = [medge, "zoo", "build", model, "--profile", "rpi4", "--force"]
        cmd += ["--out", str(bundle), "--sign-key", str(site / "bundle-signer.key")]
        must(cmd)
    name, make = MODELS[model]
    data = work / "data" / name
    data.parent.mkdir(parents=True, exist_ok=True)
    source = {**make(data), "limit": limit}
    return site, ids, bundle, source


def agent_config(path: Path, dev: str, ident: Path, bundle: Path, source: dict) -> Path:
    import yaml

    cfg = {
        "site": "ward-emu",
        "device": dev,
        "bundle": str(bundle),
        "identity": str(ident),
        "broker": {"host": "127.0.0.1", "port": 1883},  # the run's broker replaces it
        "source": source,
        "outbox": {"path": "outbox.sqlite", "resend_after_s": 0.5},
        "telemetry_interval_s": 0.5,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_and_install(work: Path, root: Path, board: str, cfg: Path) -> dict[str, Any]:
    """The aarch64 package by medge's own code, copied into the root, installed there."""
    from medge.package import build_package

    pkg = work / "pkg"
    shutil.rmtree(pkg, ignore_errors=True)
    for old in work.glob("pkg.tar.gz"):
        old.unlink()
    log("medge agent package --platform manylinux*_aarch64 --python-version 3.11")
    report = build_package(
        cfg,
        pkg,
        platforms=PLATFORMS,
        python_version=PY,
        wheel_cache=work / "wheels",
        tarball=False,
    )
    inside = root / "pkg"
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(pkg, inside)  # keeps the 0600 key
    shutil.rmtree(root / VENV.lstrip("/"), ignore_errors=True)
    env = guest_env(board)
    pip = sorted((root / "usr/share/python-wheels").glob("pip-*.whl"))[-1]
    log(f"install in the root under qemu ({env['QEMU_CPU']}): venv + pip --no-index")
    must(guest(root, "/usr/bin/python3.11", "-m", "venv", "--without-pip", VENV), env=env)
    extras = ",".join(report.extras)
    # install.sh's pip step; pip from Debian's wheel, as ensurepip would put it in the venv
    must(
        guest(
            root,
            f"{VENV}/bin/python",
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-index",
            "--find-links",
            "/pkg/wheels",
            f"medge[{extras}]",
        ),
        env={**env, "PYTHONPATH": f"/usr/share/python-wheels/{pip.name}"},
    )
    return {
        "wheels": sorted(w for w in report.wheels if "aarch64" in w or w.startswith("medge-")),
        "extras": report.extras,
    }


def infer_arm(root: Path, board: str, bundle: Path, source: dict) -> subprocess.CompletedProcess:
    """INFER in the root under qemu; the source's file is at the same path inside."""
    (root / "m").mkdir(exist_ok=True)
    (root / "m/infer.py").write_text(INFER)
    shutil.rmtree(root / "m/bundle", ignore_errors=True)
    shutil.copytree(bundle, root / "m/bundle")
    cmd = guest(root, f"{VENV}/bin/python", "/m/infer.py", "/m/bundle", json.dumps(source))
    return sh(cmd, env=guest_env(board), timeout=3600)


def _event_key(e: dict[str, Any]) -> tuple:
    """What must match between two runs' events (scores may differ in the last bits)."""
    return tuple(
        (k, round(v, 6) if isinstance(v, float) else v)
        for k, v in sorted(e.items())
        if k not in ("peak", "score", "mean", "id")
    )


def compare(arm: dict[str, Any], x86: dict[str, Any]) -> dict[str, Any]:
    a, b = arm["results"], x86["results"]
    diff = [
        abs(p - q)
        for r, s in zip(a, b, strict=True)
        for p, q in zip(r["scores"], s["scores"], strict=True)
    ]
    differing = [i for i, (r, s) in enumerate(zip(a, b, strict=True)) if r["pred"] != s["pred"]]
    ea, eb = arm["events"], x86["events"]
    return {
        "windows": len(a),
        "predictions_equal": not differing and len(a) == len(b),
        "differing_windows": differing,
        "max_score_difference": max(diff) if diff else 0.0,
        "windows_with_a_score_difference": sum(
            any(p != q for p, q in zip(r["scores"], s["scores"], strict=True))
            for r, s in zip(a, b, strict=True)
        ),
        "events": {"arm64": len(ea), "x86": len(eb)},
        "events_equal": [_event_key(e) for e in ea] == [_event_key(e) for e in eb],
        "arm64": {k: arm[k] for k in ("machine", "litert", "numpy")},
        "x86": {k: x86[k] for k in ("machine", "litert", "numpy")},
    }


def _rows(store: Any, device: str) -> tuple[list[tuple], list[dict[str, Any]]]:
    """(kind, input, pred, pred_label, score) of the device's messages in the order it sent
    them (seq: telemetry and state messages take numbers in between); its event bodies."""
    from gateway.read_models import device_events

    rows = sorted(store.results(device=device, limit=100_000), key=lambda r: r["seq"])
    keys = ("kind", "input", "pred", "pred_label", "score")
    events = [json.loads(r["body"]) for r in device_events(store, "ward-emu", device, 0.0, 100_000)]
    return [tuple(r[k] for k in keys) for r in rows], events


def run_agents(
    work: Path, root: Path, board: str, site: Path, cfgs: dict[str, Path]
) -> dict[str, Any]:
    """The installed arm64 agent and this machine's agent through Mosquitto to one gateway."""
    import yaml

    from gateway import Gateway, Store, start_broker
    from gateway.site import opener_for

    out: dict[str, Any] = {}
    store_path = work / "gw.sqlite"
    store_path.unlink(missing_ok=True)
    arm_cfg = root / "pkg/agent.yaml"
    with start_broker("mosquitto") as broker:
        for path in (arm_cfg, cfgs["rpi-x86"]):
            data = yaml.safe_load(path.read_text())
            data["broker"] = {"host": broker.host, "port": broker.port}
            path.write_text(yaml.safe_dump(data))
        (root / "pkg/outbox.sqlite").unlink(missing_ok=True)
        (cfgs["rpi-x86"].parent / "outbox.sqlite").unlink(missing_ok=True)
        run = ["-m", "medge", "agent", "run", "--json", "--config"]
        with (
            Store(store_path) as store,
            Gateway(store, opener_for(site), broker.host, broker.port, broker.protocol),
        ):
            arm = sh(
                guest(root, f"{VENV}/bin/python", *run, "/pkg/agent.yaml"),
                env=guest_env(board),
                timeout=3600,
            )
            x86 = sh([sys.executable, *run, str(cfgs["rpi-x86"])], timeout=600)
            for name, done in (("arm64", arm), ("x86", x86)):
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
                    raise SystemExit(
                        f"{name} agent failed ({done.returncode}):\n" + "\n".join(tail)
                    )
                out[name] = json.loads(done.stdout.strip().splitlines()[-1])
            time.sleep(1.0)  # the last acks' rows
            arm_rows, arm_events = _rows(store, "rpi-arm64")
            x86_rows, x86_events = _rows(store, "rpi-x86")
    scores = [abs((a[4] or 0.0) - (b[4] or 0.0)) for a, b in zip(arm_rows, x86_rows, strict=False)]
    return {
        "sent": {k: v["sent"] for k, v in out.items()},
        "acked": {k: v["acked"] for k, v in out.items()},
        "pending": {k: v["pending"] for k, v in out.items()},
        "stored": {"arm64": len(arm_rows), "x86": len(x86_rows)},
        "stored_events": {"arm64": len(arm_events), "x86": len(x86_events)},
        "same_predictions": [r[:4] for r in arm_rows] == [r[:4] for r in x86_rows],
        "same_events": [_event_key(e) for e in arm_events] == [_event_key(e) for e in x86_events],
        "max_score_difference": max(scores) if scores else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "medge-rpi")
    ap.add_argument("--board", choices=sorted(BOARDS), default="rpi4")
    ap.add_argument("--model", choices=sorted(MODELS), default="breast_cnn")
    ap.add_argument("--limit", type=int, default=78, help="windows/images (default 78)")
    ap.add_argument(
        "--qemu-cpu",
        help="QEMU_CPU instead of the board's (a diagnosis: e.g. 'max' is no Raspberry Pi)",
    )
    ap.add_argument("--no-agent", action="store_true", help="skip the broker/gateway run")
    ap.add_argument("--no-artefact-check", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: chroot and mounts")
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    root = build_root(work)
    cpu, feats, part, rev, tail = BOARDS[a.board]
    if a.qemu_cpu:
        cpu = CPU_OVERRIDE["cpu"] = a.qemu_cpu
    fake = work / f"cpuinfo-{a.board}"
    fake.write_text(_cpuinfo(feats, part, rev, tail, os.cpu_count() or 1))  # as /sys lists them

    site, ids, bundle, source = make_site(work, a.model, a.limit)
    cfgs = {
        d: agent_config(work / "agents" / d / "agent.yaml", d, ids[d], bundle, source) for d in ids
    }
    # the source's file at the same path inside the root (the package keeps the path as given)
    inside = root / source["path"].lstrip("/")
    inside.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source["path"], inside)

    result: dict[str, Any] = {"note": NOT_TIMINGS, "board": a.board, "qemu_cpu": cpu}
    result["model"] = a.model
    result["package"] = build_and_install(work, root, a.board, cfgs["rpi-arm64"])
    with mounted(root, fake):
        done = infer_arm(root, a.board, bundle, source)
        if done.returncode != 0:
            raise SystemExit(f"arm64 inference failed ({done.returncode}): {done.stderr[-2000:]}")
        arm = json.loads(done.stdout.strip().splitlines()[-1])
        x86_done = sh([sys.executable, "-c", INFER, str(bundle), json.dumps(source)])
        if x86_done.returncode != 0:
            raise SystemExit(f"x86 inference failed: {x86_done.stderr[-2000:]}")
        x86 = json.loads(x86_done.stdout.strip().splitlines()[-1])
        result["inference"] = compare(arm, x86)
        if a.no_agent:
            result["agent_via_broker"] = "skipped (--no-agent)"
        else:
            result["agent_via_broker"] = run_agents(work, root, a.board, site, cfgs)
    if not a.no_artefact_check:
        # what `qemu-aarch64-static -L ROOT` shows a program: this machine's /proc/cpuinfo
        with mounted(root, None):
            bad = infer_arm(root, a.board, bundle, {**source, "limit": 1})
        result["artefact_check"] = {
            "with_board_cpuinfo": {"returncode": done.returncode},
            "with_this_machines_cpuinfo": {
                "returncode": bad.returncode,
                "segfault": bad.returncode in (-11, 139),
                "stderr_tail": bad.stderr.strip().splitlines()[-2:],
            },
        }
    print(json.dumps(result, indent=2))
    log(NOT_TIMINGS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
