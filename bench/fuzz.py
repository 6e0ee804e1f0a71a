"""Fuzz campaign over every parser at the edge of trust: seeded, so a run is repeatable.

    python bench/fuzz.py [--n 100000] [--seed 11] [--only envelope,ack,...] [--bundle DIR]

Parsers: ``envelope`` (the clear header: Opener.open on whole messages), ``telemetry``,
``state``, ``result``, ``event`` (authenticated bodies: sealed with a real epoch key, so each
reaches the body schema), ``ack``, ``limits`` and ``cmd`` (what a device receives),
``manifest`` (the bundle loader, on ``--bundle DIR`` or else the third-party beat classifier
wrapped here) and ``config`` (the agent's YAML).
Each input is a mutation of a valid example: a field's value swapped for another JSON type,
deep nesting, integers beyond 64 bits (or of thousands of digits), NaN/Infinity, odd unicode
(lone surrogates, NUL, right-to-left marks), huge strings, missing and extra keys, truncation,
bit flips, inserted and deleted bytes.

Per parser it prints the inputs, those rejected by our own errors (MedgeError subclasses;
pydantic errors are wrapped into ConfigError/BundleError by the loaders), those accepted, and
OTHER exceptions, which must be 0, with the first few examples. Exit status 1 if any.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent import envelope as E
from edge_agent.envelope import (
    Envelope,
    Opener,
    Sealer,
    decode_ack,
    decode_limits,
    encode_ack,
    encode_limits,
)
from edge_agent.errors import EnvelopeError, MedgeError
from edge_agent.identity import DeviceIdentity
from edge_agent.schemas import parse_cmd

SITE, DEVICE = "ward-a", "fz-01"
NOW = 1_795_000_000.0
_DEEP = "\x00DEEP\x00"  # markers replaced in the JSON text (json.dumps cannot write them)
_HUGE = "\x00HUGE\x00"
_SPECIAL = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" * 5000, "9" * 40, "-0"]
_ODD_TEXT = [
    "\ud800",
    "\udfff",
    "a\x00b",
    "\u202eevil",
    "\ufeff",
    "\U0001f600",
    "é" * 300,
    "x" * 70_000,
    "",
    " ",
    "\n\r\t",
    "../../etc/passwd",
    "%s%n",
    "'; DROP TABLE x",
]

VALID_BODIES: dict[str, list[dict[str, Any]]] = {
    "result": [
        {
            "input": "breastmnist_dev:val#12",
            "input_sha256": "ab" * 32,
            "sample_time": 12.5,
            "pred": 1,
            "pred_label": "benign",
            "scores": [0.041, 0.959],
            "label": 1,
            "label_name": "benign",
            "latency_ms": 0.41,
            "bundle": "breast-cnn@1#4be2",
        },
        {
            "pred": 0,
            "pred_label": "bg",
            "scores": [],
            "mask": {
                "area_px": 10,
                "bbox": [1, 2, 3, 4],
                "components": 1,
                "contour": [[1, 2], [3, 4]],
                "size": [28, 28],
                "class_px": {"a": 1},
            },
        },
    ],
    "event": [
        {
            "event": "fall",
            "state": "start",
            "label": "fall",
            "start": 12.0,
            "peak": 0.97,
            "windows": 3,
            "input": ["imu:s07#6"],
            "alert": True,
        },
        {"update": "rolled_back", "bundle": "b@2", "running": "b@1", "reason": "probation"},
    ],
    "telemetry": [
        {
            "fps": 5.0,
            "latency_ms": {"total": {"p50": 0.4, "p99": 0.9}},
            "results": 10,
            "errors": {},
            "uptime_s": 12.5,
            "cpu_percent": 12.0,
            "rss_mb": 80.0,
            "temperature_c": None,
            "outbox_depth": 0,
            "outbox_bytes": 0,
            "outbox_drops": {},
            "mqtt": {"connected": True, "protocol": "5", "connects": 1, "connect_failures": 0},
            "source_errors": {},
            "sent": 10,
            "bundle": "b@1",
        },
    ],
    "state": [{"state": "online", "bundle": "b@1"}, {"state": "offline"}],
}
VALID_CMD = {
    "v": 2,
    "cmd": "update-bundle",
    "site": SITE,
    "device": DEVICE,
    "url": "http://fog/x.tar.gz",
    "sha256": "ab" * 32,
    "issued_ms": 1764000000000,
    "key_id": "0123456789abcdef",
    "sig": base64.b64encode(bytes(64)).decode(),
}
VALID_CONFIG = {
    "site": SITE,
    "device": DEVICE,
    "bundle": "b",
    "identity": "i",
    "source": {"path": "x.npz"},
}


# -- mutations ---------------------------------------------------------------------------------
def _random_value(rng: random.Random, depth: int = 0) -> Any:  # noqa: PLR0911
    pick = rng.randrange(12)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30])
    if pick == 3:
        return rng.choice([0.5, -0.0, 1e308, 5e-324, 1e-7])
    if pick == 4:
        return rng.choice(_ODD_TEXT)
    if pick == 5 and depth < 3:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if pick == 6 and depth < 3:
        return {rng.choice(["a", "", "state", "pred", "\ud800"]): _random_value(rng, depth + 1)}
    if pick == 7:
        return _DEEP
    if pick == 8:
        return _HUGE
    if pick == 9:
        return [0] * rng.choice([5000, 100])
    return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _to_text(doc: Any, rng: random.Random) -> str:
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    while f'"{_DEEP}"' in text or json.dumps(_DEEP) in text:
        depth = rng.choice([10, 999, 1001, 100_000])
        nest = (
            "[" * depth + "]" * depth if rng.random() < 0.5 else '{"a":' * depth + "1" + "}" * depth
        )
        text = text.replace(json.dumps(_DEEP), nest, 1)
    while json.dumps(_HUGE) in text:
        text = text.replace(json.dumps(_HUGE), rng.choice(_SPECIAL), 1)
    return text


def mutate_tree(rng: random.Random, valid: Any) -> bytes:
    """A valid document with one to three of its nodes (or keys) changed."""
    doc = json.loads(json.dumps(valid))
    for _ in range(rng.randint(1, 3)):
        paths = _paths(doc)
        path = rng.choice(paths)
        if not path:  # the whole document
            doc = _random_value(rng) if rng.random() < 0.3 else doc
            continue
        node = doc
        try:
            for key in path[:-1]:
                node = node[key]
            action = rng.randrange(4)
            if action == 0 and isinstance(node, dict):
                del node[path[-1]]
            elif action == 1 and isinstance(node, dict):
                node[rng.choice(["extra", "v", "hs", "x" * 200])] = _random_value(rng)
            else:
                node[path[-1]] = _random_value(rng)
        except (KeyError, IndexError, TypeError):
            continue
    return _to_text(doc, rng).encode("utf-8", "surrogatepass")


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Truncation, bit flips, inserted and deleted bytes, a duplicated slice."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:
            del b[rng.randrange(len(b)) :]
        elif op == 1 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            i = rng.randrange(len(b))
            del b[i : i + rng.randint(1, 16)]
        elif b:
            i = rng.randrange(len(b))
            b[i:i] = b[i : i + rng.randint(1, 64)]
    return bytes(b)


def mutate(rng: random.Random, valid: Any, raw: bytes | None = None) -> bytes:
    if rng.random() < 0.7:
        return mutate_tree(rng, valid)
    return mutate_bytes(rng, raw if raw is not None else json.dumps(valid).encode())


# -- the parsers -------------------------------------------------------------------------------
class Rig:
    """A throwaway site with one device: a sealer and the gateway's opener."""

    def __init__(self, root: Path) -> None:
        from gateway.site import init_site, opener_for, provision_device

        site = root / "site"
        init_site(site, SITE)
        ident = DeviceIdentity.load(provision_device(site, DEVICE, root / "id"), SITE, DEVICE)
        self.sealer = Sealer(SITE, DEVICE, ident.key, ident.recipient, lambda: 1)
        self.opener: Opener = opener_for(site)
        self.seq = 0

    def seal_plain(self, kind: str, plain: bytes) -> bytes:
        """A real envelope around ANY plaintext (the sealer refuses non-canonical bodies)."""
        self.seq += 1
        s = self.sealer
        tail = s._parts.tail(kind, self.seq, E._time_json(NOW))
        ct = s._aead.encrypt(
            E._nonce(self.seq), plain, b'{"alert":null,%b%b' % (s._parts.pre, tail)
        )
        return b'{"alert":null,"ct":"%b",%b%b' % (base64.b64encode(ct), s._parts.pre, tail)


def parsers(
    rig: Rig, bundle: Path | None, root: Path
) -> dict[str, tuple[Callable[[random.Random], bytes], Callable[[bytes], Any]]]:
    out: dict[str, tuple[Callable[[random.Random], bytes], Callable[[bytes], Any]]] = {}
    headers = []
    for i, kind in enumerate(("result", "event", "telemetry", "state")):
        body = VALID_BODIES[kind][0]
        headers.append(rig.sealer.seal(Envelope(kind, SITE, DEVICE, 10**6 + i, NOW, body)))
    out["envelope"] = (
        lambda rng: mutate(rng, json.loads(p := rng.choice(headers)), p),
        rig.opener.open,
    )
    for kind in ("telemetry", "state", "result", "event"):
        out[kind] = (
            lambda rng, k=kind: rig.seal_plain(k, mutate(rng, rng.choice(VALID_BODIES[k]))),
            rig.opener.open,
        )
    ack = encode_ack([1, 2, 3, 2**62])
    out["ack"] = (lambda rng: mutate(rng, json.loads(ack), ack), decode_ack)
    limits = encode_limits(100.0, 1000.0)
    out["limits"] = (lambda rng: mutate(rng, json.loads(limits), limits), decode_limits)
    out["cmd"] = (lambda rng: mutate(rng, VALID_CMD), parse_cmd)
    from edge_agent.config import load_config

    cfg = root / "agent.yaml"

    def config(data: bytes) -> Any:
        cfg.write_bytes(data)
        return load_config(cfg)

    out["config"] = (lambda rng: mutate(rng, VALID_CONFIG), config)
    if bundle is not None:
        from edge_agent.bundle import Bundle

        work = root / "bundle"
        shutil.copytree(bundle, work)
        manifest = (work / "manifest.json").read_bytes()
        doc = json.loads(manifest)

        def load(data: bytes) -> Any:
            (work / "manifest.json").write_bytes(data)
            return Bundle.load(work)

        out["manifest"] = (lambda rng: mutate(rng, doc, manifest), load)
    return out


def campaign(
    name: str,
    make: Callable[[random.Random], bytes],
    parse: Callable[[bytes], Any],
    n: int,
    seed: int,
    show: int = 3,
) -> dict[str, Any]:
    rng = random.Random(f"{seed}:{name}")
    rejected = accepted = 0
    others: list[str] = []
    other_count = 0
    reasons: dict[str, int] = {}
    t0 = time.perf_counter()
    for i in range(n):
        data = make(rng)
        try:
            parse(data)
            accepted += 1
        except MedgeError as exc:
            rejected += 1
            if "\n" in str(exc):
                other_count += 1
                others.append(f"#{i} {type(exc).__name__} of two lines: {data[:80]!r}")
            if isinstance(exc, EnvelopeError):
                reasons[exc.reason.value] = reasons.get(exc.reason.value, 0) + 1
        except Exception as exc:  # what this campaign exists to find
            other_count += 1
            if len(others) < show:
                others.append(f"#{i} {type(exc).__name__}: {str(exc)[:120]!r} on {data[:80]!r}")
    return {
        "parser": name,
        "inputs": n,
        "rejected": rejected,
        "accepted": accepted,
        "other": other_count,
        "examples": others[:show],
        "reasons": reasons,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _wrapped_bundle(root: Path) -> Path:
    """Without --bundle: the third-party beat classifier in tests/data wrapped as a bundle by
    the converter (no TensorFlow needed for a ready .tflite; under a second)."""
    from converter import ConvertRequest, convert
    from edge_agent.bundle import Preprocess

    data = Path(__file__).resolve().parent.parent / "tests" / "data"
    logging.getLogger("medge").setLevel(logging.ERROR)  # 'not signed' is expected here
    return convert(
        ConvertRequest(
            model=data / "third_party" / "classify_heartbeats_cnn.tflite",
            calib=data / "ecg_beats.npz",
            eval=data / "ecg_beats.npz",
            out=root / "wrapped",
            preprocess=Preprocess(kind="zscore"),
            labels=["N", "S", "V", "F", "Q"],
            positive_label="V",
        )
    ).directory


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="inputs per parser")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--only", default="", help="comma-separated parser names")
    ap.add_argument("--bundle", type=Path, default=None, help="a bundle dir (fuzz its manifest)")
    ap.add_argument("--json", action="store_true", help="one JSON line per parser")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="medge-fuzz-"))
    try:
        table = parsers(Rig(root), a.bundle or _wrapped_bundle(root), root)
        names = [x for x in a.only.split(",") if x] or list(table)
        failed = False
        if not a.json:
            print(f"{'parser':10} {'inputs':>8} {'rejected':>9} {'accepted':>9} {'OTHER':>6}  s")
        for name in names:
            r = campaign(name, *table[name], a.n, a.seed)
            failed |= r["other"] > 0
            if a.json:
                print(json.dumps(r))
                continue
            print(
                f"{name:10} {r['inputs']:8} {r['rejected']:9} {r['accepted']:9} "
                f"{r['other']:6}  {r['seconds']}"
            )
            if r["reasons"]:
                print(
                    "           reasons:",
                    ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())),
                )
            for example in r["examples"]:
                print("           OTHER", example)
        return 1 if failed else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
