"""`medge dashboard ...`: the fog node's live web page over a gateway store.

The gateway package is imported only when one of these commands runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_agent.errors import MedgeError
from medge.cli_gateway import CONFIG_HELP, DB_HELP, config_overrides

__all__ = ["cmd_dashboard", "cmd_dashboard_add_user", "register"]

# flag (argparse dest) -> key of the dashboard section it overrides (flag > file > default)
_DASHBOARD_FLAGS = {
    name: name
    for name in (
        "db",
        "host",
        "port",
        "users",
        "allow_anonymous",
        "title",
        "trusted_proxy",
        "secure_cookies",
    )
}


def cmd_dashboard(a: argparse.Namespace) -> int:
    from gateway.config import load_dashboard_config
    from gateway.dashboard.server import run_config

    run_config(load_dashboard_config(a.config, config_overrides(a, _DASHBOARD_FLAGS)))
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


def register(sub: Any, common: Callable[..., None]) -> None:
    """Add `dashboard` (add-user) to the `medge` commands."""
    d = sub.add_parser(
        "dashboard",
        help="serve the live web dashboard of a gateway store",
        description="Serve the alerts, the fleet and the live results of a gateway store to "
        "signed-in users (docs/dashboard.md); 'medge dashboard add-user' creates them. "
        "Settings come from --config gateway.yaml (section 'dashboard:'; its store is the "
        "gateway section's unless it names db); each flag given overrides the file's key.",
        argument_default=argparse.SUPPRESS,
    )
    d.add_argument("--config", type=Path, default=None, metavar="FILE", help=CONFIG_HELP)
    d.add_argument("--db", metavar="FILE|URL", help=DB_HELP + " [db]")
    d.add_argument("--host", help="address to listen on (default loopback) [host]")
    d.add_argument("--port", type=int, help="port (default 8080) [port]")
    d.add_argument(
        "--users", type=Path, help="users file (from 'medge dashboard add-user') [users]"
    )
    d.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve without login (local tests only: the data is patient-derived) "
        "[allow_anonymous]",
    )
    d.add_argument("--title", help="title shown on the page (default medge) [title]")
    d.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDRESS[/BITS]",
        help="a reverse proxy whose X-Forwarded-For/-Proto are believed (repeatable; "
        "from anyone else they are ignored) [trusted_proxy]",
    )
    d.add_argument(
        "--secure-cookies",
        action="store_true",
        help="mark the session cookie Secure (the page is reached over TLS) [secure_cookies]",
    )
    common(d)
    d.set_defaults(func=cmd_dashboard)
    dsub = d.add_subparsers(dest="dashboard_command", metavar="ACTION")
    du = dsub.add_parser(
        "add-user",
        help="add a dashboard user (or set a new password)",
        description="Add a user to a users file (created mode 0600); the "
        "password is stored as scrypt with a random salt.",
    )
    du.add_argument("name", help="user name: 1-64 of [A-Za-z0-9_.@-]")
    du.add_argument("--users", type=Path, required=True, help="users file")
    du.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of stdin instead of a prompt",
    )
    common(du)
    du.set_defaults(func=cmd_dashboard_add_user)
