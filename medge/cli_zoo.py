"""`medge zoo ...`: the reference models, their training and their bundles (docs/models.md)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cmd_zoo_build", "cmd_zoo_list", "cmd_zoo_train", "register"]


def cmd_zoo_list(a: argparse.Namespace) -> int:
    import models
    from medge.zoo import describe

    rows = [describe(s) for s in models.zoo()]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    w = max([len("name"), *(len(r["name"]) for r in rows)])
    print(f"{'name':{w}s} {'family':9s} {'task':15s} {'data':17s} summary")
    for r in rows:
        kind = r["data_kind"]
        print(f"{r['name']:{w}s} {r['family']:9s} {r['task']:15s} {kind:17s} {r['summary']}")
    return 0


def cmd_zoo_train(a: argparse.Namespace) -> int:
    from medge.zoo import train

    return train(a.name, a.args)


def cmd_zoo_build(a: argparse.Namespace) -> int:
    from medge.zoo import build

    bundle = build(a.name, a.profile, a.out, force=a.force, sign_key=a.sign_key)
    where = str(bundle.directory)
    if a.json:
        print(
            json.dumps({"bundle": where, "artifacts": [x.file for x in bundle.manifest.artifacts]})
        )
    else:
        print(f"{a.name} for {a.profile}: {where} (report.md beside the manifest)")
    return 0


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add `zoo` (list, train, build) to the `medge` commands."""
    z = sub.add_parser(
        "zoo",
        help="the reference models: list, train, build bundles",
        description="The model zoo: one small model per family of medical image and signal "
        "analysis, trained on real data, with its stream and its published anchor "
        "(docs/models.md).",
    )
    zsub = z.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    zl = zsub.add_parser("list", help="list the zoo's models", description="List the zoo.")
    common(zl, json_flag=True)
    zl.set_defaults(func=cmd_zoo_list)
    zt = zsub.add_parser(
        "train",
        help="retrain a zoo model (python -m models.NAME)",
        description="Retrain a zoo model with its fixed seed, overwriting its committed "
        "weights under models/weights/. Needs TensorFlow (pip install 'medge[convert]'). "
        "Arguments after the name go to the training script (e.g. --epochs 5).",
    )
    zt.add_argument("name", help="a name from 'medge zoo list'")
    zt.add_argument("args", nargs=argparse.REMAINDER, help="passed to python -m models.NAME")
    common(zt)
    zt.set_defaults(func=cmd_zoo_train)
    zb = zsub.add_parser(
        "build",
        help="convert a zoo model into a bundle for a device profile",
        description="Convert a zoo model with its own settings (labels, preprocessing, "
        "window, accuracy budget) into a bundle for --profile. Without --out the bundle is "
        "cached by content under $MEDGE_CACHE_DIR (default ~/.cache/medge) and reused.",
    )
    zb.add_argument("name", help="a name from 'medge zoo list'")
    zb.add_argument(
        "--profile", default="x86", choices=["rpi4", "rpi5", "jetson", "x86"], help="device"
    )
    zb.add_argument("--out", type=Path, help="write the bundle here (default: the cache)")
    zb.add_argument("--force", action="store_true", help="replace --out, or rebuild the cache")
    zb.add_argument(
        "--sign-key",
        type=Path,
        help="sign the bundle with this Ed25519 key (a site's bundle-signer.key); devices "
        "refuse unsigned bundles",
    )
    common(zb, json_flag=True)
    zb.set_defaults(func=cmd_zoo_build)
