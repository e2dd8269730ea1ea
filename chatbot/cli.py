"""The ``supportbot`` command line (contract: ../shared/DESIGN.md, "CLI contract").

Every command takes ``--data-dir``, ``--config`` and ``--set section.field=value``; ``--json``
prints machine-readable output only. Errors meant for users (`SupportBotError`) are printed with
their fix and exit with status 2; nothing else is caught.

Commands of the higher layers (``finetune``, ``adapters``, ``serve``) register themselves through
the ``supportbot.commands`` entry-point group (see pyproject.toml), so this package never imports
the layers above it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from chatbot.runtime import SERVING_COMMANDS, apply_threads
from chatbot.settings import Settings, load_settings
from knowledge_base.errors import SupportBotError
from knowledge_base.private import restrict_umask

__all__ = ["common_parser", "emit", "main", "progress_bar"]

Handler = Callable[[argparse.Namespace, Settings], int]


def emit(args: argparse.Namespace, payload: Any, text: str | Callable[[], str]) -> None:
    """Print JSON with ``--json``, else the human-readable text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, ensure_ascii=False))
    else:
        print(text() if callable(text) else text)


def progress_bar(enabled: bool = True, *, json_lines: bool = False) -> Callable[[str, int, int], None] | None:
    """A tqdm bar on stderr per stage (``embedding``, ...), for long jobs; with ``json_lines`` (a
    ``--json`` command whose stderr is not a terminal) one ``{"progress", "done", "total"}`` line on
    stderr every 2 s and at the end of a stage, so a script sees that a long job is moving."""
    if json_lines:
        last: dict[str, float] = {}

        def line(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - last.get(stage, 0.0) < 2.0:
                return
            last[stage] = now
            print(json.dumps({"progress": stage, "done": done, "total": total}), file=sys.stderr, flush=True)

        return line
    if not enabled:
        return None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None or bar.total != total:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="text", file=sys.stderr, leave=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", type=Path, help="data folder (default ./supportbot-data)")
    common.add_argument("--config", type=Path, help="TOML settings file")
    common.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override one setting"
    )
    common.add_argument("--json", action="store_true", help="machine-readable output only")
    return common


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SupportBotError(f"--set {item!r} has no '='", fix="write --set section.field=value")
        out[key.strip()] = value
    if args.data_dir is not None:
        out["data_dir"] = str(args.data_dir)
    return out


def build_parser() -> argparse.ArgumentParser:
    from chatbot import cli_chat, cli_kb

    common = common_parser()
    parser = argparse.ArgumentParser(
        prog="supportbot", description="Self-hosted FAQ customer-service chatbot.", parents=[]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cli_kb.add_commands(commands, [common])
    cli_chat.add_commands(commands, [common])
    for plugin in entry_points(group="supportbot.commands"):
        try:
            register = plugin.load()
        except ImportError as exc:  # a broken optional layer must not take the core commands down
            print(f"warning: command {plugin.name!r} unavailable: {exc}", file=sys.stderr)
            continue
        register(commands, [common])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous = restrict_umask()  # the data dir holds conversations and credentials: files 0600, folders 0700
    try:
        settings = load_settings(config_file=args.config, overrides=_overrides(args))
        # Before any model loads: torch's default threads collapse on a busy machine (chatbot.runtime).
        apply_threads(settings, serving=args.command in SERVING_COMMANDS, env=os.environ)
        code: int = args.func(args, settings)
        return code
    except SupportBotError as exc:
        if getattr(args, "json", False):
            print(json.dumps(exc.to_dict(), ensure_ascii=False))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        os.umask(previous)  # for in-process callers (tests); a command's process ends here anyway


if __name__ == "__main__":
    sys.exit(main())
