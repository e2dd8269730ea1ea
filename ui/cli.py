"""``supportbot serve``: the web chat, the team console and the API on one port.

Registered through the ``supportbot.commands`` entry point (``serve = "ui.cli:add_commands"``).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from chatbot.settings import Settings
from knowledge_base.errors import SupportBotError

__all__ = ["add_commands"]


def add_commands(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "serve",
        parents=parents,
        help="web chat (/), team console (/admin) and API (/api, /v1, /docs) on one port",
        description="Start SupportBot's web server. The first start prints a generated console password "
        "and API key once; only their hashes are stored (in <data_dir>/admin.json).",
    )
    p.add_argument("--host", help="address to listen on (default server.host, 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, help="TCP port (default server.port, 7860)")
    p.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the bundled demo FAQ when the knowledge base is empty (default: on)",
    )
    p.add_argument("--reset-password", action="store_true", help="generate a new console password, print it once")
    p.add_argument("--reset-api-key", action="store_true", help="generate a new API key, print it once")
    p.add_argument(
        "--hash-password",
        action="store_true",
        help="read a password (prompt, or stdin when piped), print its hash for server.admin_password_hash, exit",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    if args.hash_password:
        from ui.auth import hash_password

        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
        print(hash_password(password))
        return 0
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        if not 0 < args.port < 65536:
            raise SupportBotError(f"--port {args.port} is not a TCP port", fix="use 1-65535, e.g. 7860")
        server["port"] = args.port
    if server:
        settings = settings.replace(server=server)

    from ui.server import serve

    serve(settings, demo=args.demo, reset_password=args.reset_password, reset_api_key=args.reset_api_key)
    return 0
