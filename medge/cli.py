"""The ``medge`` command. Subcommands import their part of medge only when they run, so the
device's ``medge agent`` never imports the converter (or TensorFlow)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from edge_agent.errors import MedgeError
from medge import __version__

__all__ = ["main"]

EXIT_ERROR = 2


def _common(p: argparse.ArgumentParser, json_flag: bool = False) -> None:
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default: info)",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _preprocess(spec: str) -> Any:
    from edge_agent.bundle import Preprocess

    kind, _, rest = spec.partition(":")
    if kind == "mean_std":
        try:
            mean_s, std_s = rest.split("/")
            mean = [float(v) for v in mean_s.split(",")]
            std = [float(v) for v in std_s.split(",")]
        except ValueError as exc:
            raise MedgeError("--preprocess mean_std:M1,M2,../S1,S2,.. (per channel)") from exc
        return Preprocess(kind="mean_std", mean=mean, std=std)
    if kind not in ("none", "scale01", "zscore") or rest:
        raise MedgeError(f"--preprocess '{spec}': one of none, scale01, zscore, mean_std:M/S")
    return Preprocess(kind=kind)


def _budget(items: list[str]) -> dict[str, float]:
    out = {}
    for item in (part.strip() for arg in items for part in arg.split(",") if part.strip()):
        metric, _, drop = item.partition("=")
        try:
            out[metric] = float(drop)
        except ValueError as exc:
            raise MedgeError(f"--budget '{item}': use METRIC=DROP, e.g. sensitivity=0.005") from exc
    return out


_SHOWN = ("accuracy", "sensitivity", "specificity", "auc", "dice", "hd95", "psnr", "ssim")


def cmd_convert(a: argparse.Namespace) -> int:
    from converter import ConvertRequest, convert, progress

    if not a.json:
        progress.enable()  # a live line per step when stderr is a terminal
    try:
        bundle = convert(_convert_request(a, ConvertRequest))
    finally:
        progress.disable()
    return _print_converted(a, bundle)


def _convert_request(a: argparse.Namespace, request: Any) -> Any:
    return request(
        model=a.model,
        calib=a.calib,
        eval=a.eval,
        out=a.out,
        profile=a.profile,
        preprocess=_preprocess(a.preprocess),
        labels=a.labels.split(",") if a.labels else None,
        positive_label=a.positive,
        threshold=a.threshold,
        name=a.name,
        calib_split=a.calib_split,
        eval_split=a.eval_split,
        force=a.force,
        budget=_budget(a.budget),
        sign_key=a.sign_key,
        cam=a.cam is not None,
        cam_layer=a.cam or None,
        strategies=a.strategy or None,
        min_agreement=a.min_agreement,
        onnx=not a.no_onnx,
        activation=a.activation,
        task=a.task,
        onnx_input=a.onnx_input,
        mask_threshold=a.mask_threshold,
        fallback=a.fallback.split(",") if a.fallback is not None else None,
        float_artifacts=a.float_artifacts,
    )


def _print_converted(a: argparse.Namespace, bundle: Any) -> int:
    m = bundle.manifest
    if a.json:
        print(
            json.dumps(
                {"bundle": bundle.id, "path": str(bundle.directory), "metrics": m.metrics}, indent=2
            )
        )
    else:
        print(f"wrote {bundle.directory} ({bundle.id})")
        for variant, metrics in m.metrics.items():
            shown = ", ".join(
                f"{k} {v:.4f}"
                for k, v in metrics.items()
                if k in _SHOWN and v is not None
            )
            print(f"  {variant:12s} {shown}")
        print(f"  report: {bundle.directory / 'report.md'}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from converter import evaluate_bundle

    result = evaluate_bundle(a.bundle, a.data, a.split, a.runtime, a.precision)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            if k != "confusion":
                print(f"{k:14s} {v:.4f}" if isinstance(v, float) else f"{k:14s} {v}")
    return 0


def cmd_agent_run(a: argparse.Namespace) -> int:
    import signal
    import threading

    from edge_agent import Agent, load_config

    agent = Agent(load_config(a.config))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    report = agent.run(stop, drain_timeout=a.drain_timeout)
    print(
        json.dumps(report.__dict__)
        if a.json
        else f"{report.device}: sent {report.sent}, acknowledged {report.acked}, "
        f"still in the outbox {report.pending}"
    )
    return 0


def cmd_agent_check(a: argparse.Namespace) -> int:
    from edge_agent import load_config

    cfg = load_config(a.config)
    print(f"{a.config}: OK (site {cfg.site}, device {cfg.device}, bundle {cfg.bundle})")
    return 0


def cmd_agent_package(a: argparse.Namespace) -> int:
    from medge.package import build_package

    report = build_package(
        a.config,
        a.out,
        platforms=a.platform,
        python_version=a.python_version,
        wheel_cache=a.wheel_cache,
        tarball=not a.no_tarball,
        extras=a.extra or (),
    )
    if a.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"{report.directory}: {len(report.wheels)} wheels, bundle {report.bundle}")
        if report.tarball:
            print(f"{report.tarball}: copy it to the device, unpack, sudo ./install.sh")
    return 0


_DB_HELP = (
    "the store: a SQLite file (default gateway.sqlite; also sqlite:///FILE) or a PostgreSQL "
    "URL postgresql://USER[:PASSWORD]@HOST[:PORT]/DB shared by several gateway workers "
    "(docs/config.md, 'Gateway storage')"
)


def _db_arg(text: str) -> Path | str:
    """--db: a postgresql:// URL, kept as text; otherwise a SQLite file (path or sqlite:///)."""
    if text.startswith(("postgresql://", "postgres://")):
        return text
    return Path(text.removeprefix("sqlite:///"))


def _forward_outbox_beside(db: Path | str) -> Path:
    """The default forward outbox: DB.forward.sqlite beside a SQLite --db."""
    if isinstance(db, str):
        raise MedgeError("--forward-to with a PostgreSQL --db needs --forward-outbox FILE: the "
                         "forward outbox is a file on this gateway's own disk")
    return db.with_name(db.stem + ".forward.sqlite")


def cmd_gateway_run(a: argparse.Namespace) -> int:
    import signal
    import threading

    from gateway import Gateway, Store
    from gateway.alerts import AlertRules
    from gateway.broker_config import gateway_client_files
    from gateway.forward import Forwarder, ForwardOutbox, backfill, parse_since
    from gateway.metrics import MetricsServer
    from gateway.site import opener_for

    if a.tier == "cloud" and (a.relay_for or a.forward_to):
        raise MedgeError("--tier cloud opens every message itself: no --relay-for/--forward-to")
    if a.backfill and not a.forward_to:
        raise MedgeError("--backfill re-queues stored results for the cloud: add --forward-to")
    since = parse_since(a.backfill) if a.backfill else None
    opener = opener_for(a.site_dir, relay_for=tuple(a.relay_for), keys=tuple(a.cloud_key))
    forward = None
    if a.forward_to:
        fhost, _, fport = a.forward_to.rpartition(":")
        forward = Forwarder(
            ForwardOutbox(a.forward_outbox or _forward_outbox_beside(a.db)),
            fhost or "127.0.0.1",
            int(fport),
            client_id=f"{a.client_id}-forward",
            resend_after=a.forward_resend_after,
            tls=tuple(a.forward_tls) if a.forward_tls else None,  # type: ignore[arg-type]
        )
    rules = AlertRules(silence_after=a.silence_after)
    host, _, port = a.broker.rpartition(":")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with (
        Store(a.db) as store,
        Gateway(
            store,
            opener,
            host or "127.0.0.1",
            int(port),
            a.protocol,
            client_id=a.client_id,
            share_group=a.share_group,
            tls=gateway_client_files(a.site_dir) if a.tls else None,
            rules=rules,
            forward=forward,
            device_rate=a.device_rate,
            device_burst=a.device_burst,
        ) as gw,
    ):
        gw.batch_window, gw.batch_when_idle = a.batch_window, a.batch_when_idle
        if forward is not None and since is not None:
            backfill(store, forward.outbox, since)
        metrics = None
        if a.metrics_port is not None:
            metrics = MetricsServer(gw.metrics, a.metrics_host, a.metrics_port).start()
        try:
            logging.getLogger("medge.gateway").info("storing into %s; Ctrl-C to stop",
                                                    store.location)
            stop.wait()
        finally:
            if metrics is not None:
                metrics.stop()
        print(json.dumps(gw.stats.__dict__))
    return 0


def cmd_dashboard(a: argparse.Namespace) -> int:
    from gateway.dashboard import run_dashboard

    run_dashboard(a.db, a.host, a.port, a.title, users=a.users,
                  allow_anonymous=a.allow_anonymous)
    return 0


def cmd_dashboard_add_user(a: argparse.Namespace) -> int:
    import getpass

    from gateway.dashboard import add_user

    if a.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {a.name}: ")
        if getpass.getpass("again: ") != password:
            raise MedgeError("the passwords differ")
    add_user(a.users, a.name, password)
    print(f"{a.users}: user {a.name} added (mode 0600)")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from medge.demo import DemoOptions, run_demo

    summary = run_demo(
        DemoOptions(
            duration=a.duration,
            devices=a.devices,
            broker=a.broker,
            host=a.host,
            port=a.port,
            rate_hz=a.rate,
            bundle=a.bundle,
            workdir=a.workdir,
        )
    )
    ok = all(s.ok for s in summary)
    if a.json:
        print(json.dumps({"ok": ok, "devices": [s.__dict__ for s in summary]}, indent=2))
    else:
        print(f"{'device':10s} {'sent':>6s} {'stored':>7s} {'duplicates':>11s} {'pending':>8s}")
        for s in summary:
            print(f"{s.device:10s} {s.sent:6d} {s.stored:7d} {s.duplicates:11d} {s.pending:8d}")
        print("every result sent was stored" if ok else "LOSS: some results were not stored")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medge",
        description="Take medical deep-learning models to edge devices and watch them work.",
        epilog="Start with 'medge demo' to see the whole chain on this machine.",
    )
    p.add_argument("--version", action="version", version=f"medge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "convert",
        help="quantize a trained model into a verified bundle",
        description="Convert a trained model into a bundle for a device profile: LiteRT full "
        "int8, ONNX fp32 and ONNX int8 (QDQ), each evaluated with the device runtime against the "
        "float model on the evaluation data (report.md / report.json in the bundle), checked "
        "against --budget, and signed with --sign-key. LiteRT conversion strategies are tried "
        "in order until one works; with --budget the cheapest artifact that meets it wins "
        "(full int8, int8 with the worst layers in float, 16x8, fp16, fp32; docs/convert.md). "
        "A ready .tflite (or .onnx) model is wrapped as it is and evaluated with the device "
        "runtime; --onnx-input quantize makes ONNX fp32 + int8 from an .onnx instead.",
    )
    c.add_argument(
        "model",
        type=Path,
        help="trained model: .keras, legacy .h5, a SavedModel directory, or .onnx; "
        "or a ready .tflite to wrap",
    )
    c.add_argument(
        "--calib", type=Path, required=True, help="calibration data: npz with x (or <split>_images)"
    )
    c.add_argument(
        "--eval",
        type=Path,
        required=True,
        help="labelled evaluation data: npz with x/y (or <split>_images/_labels)",
    )
    c.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    c.add_argument(
        "--profile",
        default="x86",
        choices=["rpi4", "rpi5", "jetson", "x86"],
        help="target device profile (default: x86)",
    )
    c.add_argument(
        "--preprocess",
        default="none",
        help="how raw samples become model input: none, scale01 (x/255), zscore "
        "(per window, per channel), mean_std:M1,M2/S1,S2 (default: none)",
    )
    c.add_argument(
        "--labels",
        help="class names in output order, comma-separated (default: the npz's 'labels' array)",
    )
    c.add_argument("--positive", help="the clinically positive class, for sensitivity")
    c.add_argument(
        "--threshold",
        type=float,
        help="binary models: predict the positive class when its score >= this",
    )
    c.add_argument("--name", help="bundle name (default: the model file's stem)")
    c.add_argument(
        "--calib-split", help="split of a MedMNIST-style calibration npz (default train)"
    )
    c.add_argument("--eval-split", help="split of a MedMNIST-style evaluation npz (default val)")
    c.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="METRIC=DROP",
        help="largest allowed drop from float, e.g. sensitivity=0.005,auc=0.005 (repeatable; "
        "segmentation: dice, iou, hd95 (a rise); image_to_image: psnr, ssim); the cheapest "
        "artifact that meets it wins; none does: no bundle, exit 2",
    )
    c.add_argument(
        "--sign-key",
        type=Path,
        help="Ed25519 key that signs the bundle (a site's bundle-signer.key); "
        "devices refuse unsigned bundles",
    )
    c.add_argument("--force", action="store_true", help="replace an existing --out directory")
    c.add_argument(
        "--cam",
        nargs="?",
        const="",
        metavar="LAYER",
        help="add the class activation map as a second output (CNNs with a global-average-"
        "pooling head; LAYER: the feature layer, found from the head by default)",
    )
    c.add_argument(
        "--strategy",
        action="append",
        metavar="NAME",
        help="LiteRT conversion strategy to try (repeatable, in order; default all: "
        "full-int8, unrolled-int8, legacy-lstm-int8, mixed-int8, dynamic-range)",
    )
    c.add_argument(
        "--min-agreement",
        type=float,
        default=0.9,
        help="a LiteRT artifact must agree with float on this fraction of the evaluation "
        "samples, else the next strategy is tried (default 0.9)",
    )
    c.add_argument("--no-onnx", action="store_true", help="make the LiteRT artifact only")
    c.add_argument(
        "--activation",
        default="softmax",
        choices=["softmax", "sigmoid", "none"],
        help="what the model's last layer applies (default softmax; none = logits)",
    )
    c.add_argument(
        "--float-artifacts",
        default="auto",
        choices=["auto", "none", "fp16", "fp32"],
        help="a float LiteRT file beside the int8 one: auto = only on the x86 profile where it "
        "measured >= 2x faster here (a timing: may differ between runs), none, or always "
        "fp16/fp32 (default auto; pick one for a bundle whose file list never varies)",
    )
    c.add_argument(
        "--fallback",
        metavar="RUNGS",
        help="with --budget: what the search may fall back to when full int8 misses, in this "
        "order: mixed (int8, worst layers float), int16x8, fp16, fp32 (default all; 'none': "
        "full int8 or nothing)",
    )
    c.add_argument(
        "--task",
        default="classification",
        choices=["classification", "segmentation", "image_to_image"],
        help="what the model does (default classification); segmentation: the npz's y (or "
        "<split>_masks) holds masks, scored by Dice/IoU/HD95; image_to_image: y (or "
        "<split>_targets) holds the wanted images, scored by PSNR/SSIM",
    )
    c.add_argument(
        "--mask-threshold",
        type=float,
        default=0.5,
        help="segmentation: a pixel is foreground when its probability >= this (default 0.5)",
    )
    c.add_argument(
        "--onnx-input",
        default="wrap",
        choices=["wrap", "quantize"],
        help="an .onnx model: wrap it as it is (default), or quantize it: ONNX fp32 (the model) "
        "and QDQ int8, both evaluated (no LiteRT artifact: that needs onnx2tf)",
    )
    _common(c, json_flag=True)
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser(
        "evaluate",
        help="measure a bundle on labelled data",
        description="Run a bundle's artifact with the device runtime and its own "
        "preprocessing over labelled data; print accuracy, sensitivity, "
        "specificity, precision, F1 and AUC.",
    )
    e.add_argument("bundle", type=Path, help="bundle directory")
    e.add_argument("--data", type=Path, required=True, help="labelled npz")
    e.add_argument("--split", help="split of a MedMNIST-style npz (default: x/y, else val)")
    e.add_argument(
        "--runtime",
        default="litert",
        choices=["litert", "onnx"],
        help="which runtime's artifact to run (default: litert)",
    )
    e.add_argument(
        "--precision",
        choices=["int8", "fp32", "fp16", "int16x8", "dynamic"],
        help="which artifact of that runtime (default: the first listed)",
    )
    _common(e, json_flag=True)
    e.set_defaults(func=cmd_evaluate)

    ag = sub.add_parser(
        "agent",
        help="the on-device runtime",
        description="Run the edge agent, or check its configuration file.",
    )
    agsub = ag.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    r = agsub.add_parser(
        "run",
        help="run the agent with a YAML config",
        description="Load and verify the bundle, replay the source, publish "
        "results through the disk outbox until the source ends or Ctrl-C.",
    )
    r.add_argument("--config", type=Path, required=True, help="agent YAML (see docs/config.md)")
    r.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for acks before exiting (default 10)",
    )
    _common(r, json_flag=True)
    r.set_defaults(func=cmd_agent_run)
    k = agsub.add_parser("check-config", help="validate an agent YAML and point at the bad line")
    k.add_argument("config", type=Path)
    _common(k)
    k.set_defaults(func=cmd_agent_check)
    pk = agsub.add_parser(
        "package",
        help="build a self-contained device package (wheels, bundle, identity, systemd unit)",
        description="Build a directory and .tar.gz that install the agent on a device with no "
        "network: wheels of medge[device] plus the extras the config needs (device-video for "
        "a video/images source, device-dicom, device-onnx for runtime onnx, serial) for the "
        "target, the signed bundle, the config, the identity, a systemd unit and install.sh "
        "(docs/device.md).",
    )
    pk.add_argument("--config", type=Path, required=True, help="agent YAML (see docs/config.md)")
    pk.add_argument("--out", type=Path, required=True, help="package directory to create")
    pk.add_argument(
        "--platform",
        action="append",
        help="target wheel platform, repeatable (e.g. manylinux2014_aarch64 and "
        "manylinux_2_28_aarch64 for a Raspberry Pi; default: this machine)",
    )
    pk.add_argument("--python-version", help="target Python, e.g. 3.11 (default: this one)")
    pk.add_argument(
        "--wheel-cache",
        type=Path,
        help="reuse downloaded wheels from here (default ~/.cache/medge-wheels)",
    )
    pk.add_argument(
        "--extra",
        action="append",
        metavar="NAME",
        help="ship another device extra too, repeatable (e.g. device-video for JPEG-compressed "
        "DICOM, which the config alone does not reveal)",
    )
    pk.add_argument("--no-tarball", action="store_true", help="only the directory")
    _common(pk, json_flag=True)
    pk.set_defaults(func=cmd_agent_package)

    g = sub.add_parser(
        "gateway",
        help="the fog-node service",
        description="Subscribe to devices, store each result once, acknowledge.",
    )
    gsub = g.add_subparsers(dest="gateway_command", required=True, metavar="ACTION")
    gr = gsub.add_parser("run", help="run the gateway against a broker")
    gr.add_argument("--broker", default="127.0.0.1:1883", help="HOST:PORT (default 127.0.0.1:1883)")
    gr.add_argument("--protocol", default="5", choices=["5", "3.1.1"], help="MQTT version")
    gr.add_argument(
        "--site-dir",
        type=Path,
        required=True,
        help="site directory (from 'medge site init'): keys and registered devices",
    )
    gr.add_argument("--db", type=_db_arg, default=Path("gateway.sqlite"), metavar="FILE|URL",
                    help=_DB_HELP)
    gr.add_argument("--client-id", default="medge-gateway", help="MQTT client id of this worker")
    gr.add_argument("--share-group", help="MQTT 5 shared-subscription group for several workers")
    gr.add_argument("--relay-for", type=Path, action="append", default=[],
                    help="end-to-end mode: accept messages sealed to this public key (the "
                    "cloud's) unread, checking each device signature (repeatable)")
    gr.add_argument("--tls", action="store_true",
                    help="connect with the site's gateway certificate (site broker from "
                    "'medge gateway broker-config')")
    gr.add_argument("--tier", choices=["fog", "cloud"], default="fog",
                    help="fog: the site's gateway (default); cloud: the cloud tier that stores "
                    "what fog gateways forward and acks them (docs/forwarding.md)")
    gr.add_argument("--cloud-key", type=Path, action="append", default=[], metavar="FILE",
                    help="also open messages sealed to this private key (the cloud's, from "
                    "'medge site cloud-key'; end-to-end mode) (repeatable)")
    gr.add_argument("--forward-to", metavar="HOST:PORT",
                    help="forward every stored result/event to this cloud broker through an "
                    "outbox on disk, deleted only on the cloud gateway's ack")
    gr.add_argument("--forward-outbox", type=Path, metavar="FILE",
                    help="the forward outbox (default: DB.forward.sqlite beside --db)")
    gr.add_argument("--forward-tls", type=Path, nargs=3, metavar=("CA", "CERT", "KEY"),
                    help="TLS to the cloud broker: CA certificate, client certificate, key")
    gr.add_argument("--forward-resend-after", type=float, default=10.0, metavar="SECONDS",
                    help="resend to the cloud what it has not acknowledged (default 10)")
    gr.add_argument("--backfill", metavar="SINCE",
                    help="with --forward-to: also queue for the cloud the results already "
                    "stored since SINCE (all, 30m, 24h, 7d, an ISO date/time or a Unix time); "
                    "the cloud keeps each once")
    gr.add_argument("--device-rate", type=float, default=100.0, metavar="MSG_PER_S",
                    help="flood limit per device: messages per second (default 100; 0: no "
                    "limit); messages over it are not acknowledged, so the device resends them")
    gr.add_argument("--device-burst", type=float, default=1000.0, metavar="N",
                    help="messages a device may send at once above its rate (default 1000)")
    gr.add_argument("--batch-window", type=float, default=0.005, metavar="SECONDS",
                    help="under load, gather results this long into one store commit (default "
                    "0.005); a result that finds the gateway idle is committed at once")
    gr.add_argument("--batch-when-idle", action="store_true",
                    help="wait the batch window also when idle (a fixed window, as before "
                    "adaptive batching; for comparison)")
    gr.add_argument("--silence-after", type=float, default=30.0, metavar="SECONDS",
                    help="alert when a device sends nothing for this long (default 30)")
    gr.add_argument("--metrics-port", type=int, metavar="N",
                    help="serve Prometheus metrics at http://HOST:N/metrics (0: any free port)")
    gr.add_argument("--metrics-host", default="127.0.0.1",
                    help="address of the metrics endpoint (default loopback)")
    _common(gr)
    gr.set_defaults(func=cmd_gateway_run)
    from medge.cli_site import register_broker_config

    register_broker_config(gsub, _common)

    d = sub.add_parser(
        "dashboard",
        help="serve the live web dashboard of a gateway store",
        description="Serve the alerts, the fleet and the live results of a gateway store to "
        "signed-in users (docs/dashboard.md); 'medge dashboard add-user' creates them.",
    )
    d.add_argument("--db", type=_db_arg, default=Path("gateway.sqlite"), metavar="FILE|URL",
                   help=_DB_HELP)
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    d.add_argument("--users", type=Path, help="users file (from 'medge dashboard add-user')")
    d.add_argument("--allow-anonymous", action="store_true",
                   help="serve without login (local tests only: the data is patient-derived)")
    d.add_argument("--title", default="medge", help="title shown on the page")
    _common(d)
    d.set_defaults(func=cmd_dashboard)
    dsub = d.add_subparsers(dest="dashboard_command", metavar="ACTION")
    du = dsub.add_parser("add-user", help="add a dashboard user (or set a new password)",
                         description="Add a user to a users file (created mode 0600); the "
                         "password is stored as scrypt with a random salt.")
    du.add_argument("name", help="user name: 1-64 of [A-Za-z0-9_.@-]")
    du.add_argument("--users", type=Path, required=True, help="users file")
    du.add_argument("--password-stdin", action="store_true",
                    help="read the password from the first line of stdin instead of a prompt")
    _common(du)
    du.set_defaults(func=cmd_dashboard_add_user)

    from medge.cli_site import register

    register(sub, _common)

    m = sub.add_parser(
        "demo",
        help="the whole chain on this machine, on real recorded data",
        description="Start a broker (Mosquitto if installed, else embedded), the "
        "gateway, the dashboard and simulated devices replaying BreastMNIST "
        "ultrasound images through the zoo's int8 CNN. Ctrl-C stops it; with "
        "--duration it stops by itself, prints per-device sent/stored/duplicates "
        "and exits 1 if anything sent was not stored.",
    )
    m.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    m.add_argument("--devices", type=int, default=2, help="simulated devices (default 2)")
    m.add_argument(
        "--broker",
        default="auto",
        choices=["auto", "mosquitto", "embedded"],
        help="which broker to start (default: mosquitto if installed)",
    )
    m.add_argument("--host", default="127.0.0.1", help="dashboard address (default loopback)")
    m.add_argument("--port", type=int, default=8080, help="dashboard port (0: any free one)")
    m.add_argument("--rate", type=float, default=4.0, help="images per second per device")
    m.add_argument("--bundle", type=Path, help="use this bundle instead of the zoo's CNN")
    m.add_argument("--workdir", type=Path, help="where stores and outboxes go (default: temp)")
    _common(m, json_flag=True)
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except MedgeError as exc:
        print(f"medge: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `medge evaluate ... --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
