"""The ``medge`` command. Each command family builds its own parser in its own module
(``cli_convert``, ``cli_agent``, ``cli_gateway``, ``cli_dashboard``, ``cli_site``,
``cli_demo``); this one assembles them, in the order ``medge --help`` lists them, and turns
errors into one line.

Subcommands import their part of medge only when they run, so the device's ``medge agent``
never imports the converter (or TensorFlow)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from edge_agent.errors import MedgeError, one_line
from medge import (
    __version__,
    cli_agent,
    cli_bench,
    cli_convert,
    cli_dashboard,
    cli_demo,
    cli_gateway,
    cli_site,
    cli_zoo,
)

__all__ = ["build_parser", "main"]

EXIT_ERROR = 2
FILE_UMASK = 0o077
"""Every file medge creates (stores, outboxes with their -wal/-shm, keys, users files) is
readable by its owner only: the data is patient-derived. Files another account must read (the
broker's, from `medge gateway broker-config`) get their group bits back explicitly."""


def _common(p: argparse.ArgumentParser, json_flag: bool = False) -> None:
    """The flags every subcommand takes: --log-level, and --json where it prints results."""
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="how much to log on stderr (default: info)",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medge",
        description="Take medical deep-learning models to edge devices and watch them work.",
        epilog="Start with 'medge demo' to see the whole chain on this machine.",
    )
    p.add_argument("--version", action="version", version=f"medge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_convert.register(sub, _common)  # convert, evaluate
    cli_agent.register(sub, _common)  # agent run | check-config | package
    cli_gateway.register(sub, _common)  # gateway run|check-config|push-bundle|... (cli_gateway)
    cli_dashboard.register(sub, _common)  # dashboard [add-user]
    cli_site.register(sub, _common)  # site init|rotate-key|cloud-key|source-key, device ...|revoke
    cli_zoo.register(sub, _common)  # zoo list | train | build
    cli_demo.register(sub, _common)  # demo
    cli_bench.register(sub, _common)  # bench
    return p


def main(argv: list[str] | None = None) -> int:
    os.umask(FILE_UMASK)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except MedgeError as exc:
        # one line whatever the message holds (a key from an untrusted file may hold a newline)
        print(f"medge: error: {one_line(str(exc), 2000)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `medge evaluate ... --json | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
