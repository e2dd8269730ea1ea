"""One server for everything (``supportbot serve``): FastAPI + uvicorn, with Gradio mounted in it.

| path | what | login |
|---|---|---|
| ``/`` | customer chat (Gradio, ``ui.chat_page``) | none |
| ``/admin`` | team console (Gradio, ``ui.console``) | Gradio's login page, checked by `ui.auth` |
| ``/api``, ``/v1`` | HTTP API (`ui.api`) | per route |
| ``/docs``, ``/openapi.json`` | OpenAPI | none |

The Gradio pages are imported lazily and mounted when their modules exist, so the API runs (and is
tested) without them. Gradio 6 ignores ``theme``/``css``/``head``/``js`` given to ``gr.Blocks()``
when the app is mounted: a page module hands them over as ``mount_options() -> dict`` (or a
``MOUNT_OPTIONS`` dict); the console uses the chat page's when it has none of its own.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, RedirectResponse

from chatbot.settings import Settings
from ui.api import add_api
from ui.auth import Auth
from ui.security import Guards, SecurityMiddleware, cors_origins
from ui.warmup import WarmingApp

if TYPE_CHECKING:
    from chatbot.engine import ChatEngine

__all__ = ["banner_lines", "create_app", "serve", "warm_up"]

log = logging.getLogger(__name__)

#: Gradio's cache cleanup for the console: (every n seconds, delete files older than n seconds).
TEMP_FILE_CLEANUP = (3600, 3600)
#: Gradio 6 takes these at mount time, not in ``gr.Blocks()``.
STYLE_KEYS = ("theme", "css", "css_paths", "js", "head", "head_paths")
#: What a page's ``mount_options()`` may set.
MOUNT_KEYS = (*STYLE_KEYS, "footer_links", "run_history", "favicon_path", "pwa", "i18n", "max_file_size")
DESCRIPTION = """\
SupportBot answers customers from your FAQ, cites it, and hands off when it does not know.

* **Chat**: `POST /api/chat` (JSON, or server-sent events with `"stream": true`), `POST /api/feedback`.
* **Knowledge base** (`Authorization: Bearer <api key>` or the console login as HTTP Basic):
  `/api/kb/entries`, `/api/kb/upload`, `/api/kb/search`; `/api/conversations/export.csv`.
  Entry ids may contain `/`: the id is the rest of the path (or percent-encode it).
* **OpenAI-compatible**: `POST /v1/chat/completions`, `GET /v1/models` (the API key only when
  `server.api_key` is set).

Errors are JSON `{"error", "message", "fix"}`; a rejected upload adds `problems`, row by row.
"""
FALLBACK_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SupportBot</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body style="font-family: sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem">
<h1>SupportBot</h1><p>The chat page is not installed in this build. The API is running:
see <a href="docs">the API documentation</a>.</p></body></html>"""


def _page_options(module: Any) -> dict[str, Any] | None:
    """A page module's mount options: ``mount_options()`` or ``MOUNT_OPTIONS``; None if it has neither."""
    options = getattr(module, "mount_options", None)
    if callable(options):
        return dict(options())
    constant = getattr(module, "MOUNT_OPTIONS", None)
    return dict(constant) if constant is not None else None


def _build_page(module_name: str, builder: str, *args: Any) -> tuple[Any, dict[str, Any] | None]:
    """``(blocks, mount options)`` from ``ui.<page>``, or ``(None, None)`` when the module is absent."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the page exists but something it needs does not: say so
            raise
        log.info("%s is not installed; %s is not mounted", module_name, builder)
        return None, None
    return getattr(module, builder)(*args), _page_options(module)


def _mount_options(blocks: Any, options: dict[str, Any] | None, max_file_size: int) -> dict[str, Any]:
    """Our defaults, then the page's options, then what it gave ``gr.Blocks()`` (a mount would drop it)."""
    out: dict[str, Any] = {"footer_links": [], "run_history": False, "max_file_size": max_file_size}
    out.update({k: v for k, v in (options or {}).items() if k in MOUNT_KEYS})
    for key in STYLE_KEYS:
        value = getattr(blocks, f"_deprecated_{key}", None)
        if key not in out and value is not None:
            out[key] = value
    return out


def create_app(
    settings: Settings,
    engine: ChatEngine,
    *,
    chat_ui: Any = None,
    console_ui: Any = None,
    auth: Auth | None = None,
) -> FastAPI:
    """The whole web app. ``chat_ui`` / ``console_ui``: a ``gr.Blocks`` to mount, ``None`` to build
    the one from ``ui.chat_page`` / ``ui.console`` when installed, or ``False`` for none.
    ``auth`` defaults to the credentials from the settings and data dir (created on first start)."""
    auth = auth or Auth(settings)
    app = FastAPI(
        title="SupportBot",
        description=DESCRIPTION,
        version=_version(),
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    guards = Guards.from_settings(settings)
    # Always installed, with no origin unless configured: Gradio leaves CORS to a parent app that has
    # this middleware, and otherwise reflects any Origin under a non-localhost Host (docs/security.md).
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors_origins(settings),
        allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        allow_credentials=False,
    )
    app.add_middleware(SecurityMiddleware, guards=guards)  # outermost: before CORS and every route
    add_api(app, settings, engine, auth, guards)

    @app.get("/admin", include_in_schema=False)
    async def admin_redirect() -> RedirectResponse:
        # Gradio's mount answers only below "/admin/"; the banner and README print "/admin".
        return RedirectResponse("/admin/", status_code=307)

    import_gradio = chat_ui is not False or console_ui is not False
    chat_options: dict[str, Any] | None = None
    console_options: dict[str, Any] | None = None
    if chat_ui is None:
        chat_ui, chat_options = _build_page("ui.chat_page", "build_chat_page", engine, guards)
    if console_ui is None:
        console_ui, console_options = _build_page("ui.console", "build_console", engine, settings, auth)
        # One look for both pages unless the console brings its own.
        console_options = console_options if console_options is not None else chat_options
    if import_gradio and (console_ui or chat_ui):
        import gradio as gr

        max_file_size = int(settings.kb.max_upload_mb * 1024 * 1024)
        # /admin first: a mount at / matches every path.
        if console_ui:
            # Uploaded FAQ files and exports are deleted an hour after they were written (and at
            # shutdown): Gradio keeps them in its temp folder otherwise.
            console_ui.delete_cache = console_ui.delete_cache or TEMP_FILE_CLEANUP
            gr.mount_gradio_app(
                app,
                console_ui,
                path="/admin",
                auth=auth.gradio_login,
                auth_message="SupportBot team console: log in with the admin account.",
                **_mount_options(console_ui, console_options, max_file_size),
            )
        if chat_ui:
            gr.mount_gradio_app(app, chat_ui, path="/", **_mount_options(chat_ui, chat_options, max_file_size))
    if not chat_ui:

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def home() -> str:
            return FALLBACK_PAGE

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("supportbot")
    except PackageNotFoundError:  # pragma: no cover
        return "0"


def warm_up(engine: ChatEngine, *, embedder: bool = True, generator: bool = True) -> dict[str, float]:
    """Load and exercise the models (one embedding, one search, a 1-token generation) so the first
    customer does not wait; returns the seconds each step took. A generator that fails to load is
    reported, not fatal: FAQ answers need no generator."""
    timings: dict[str, float] = {}
    if embedder:
        start = time.perf_counter()
        engine.kb.search("How do I track my order?", 1)
        timings["warm-up: embedder"] = time.perf_counter() - start
    if not generator:
        return timings
    start = time.perf_counter()
    try:
        engine.generator.generate(
            [{"role": "system", "content": "Reply briefly."}, {"role": "user", "content": "Hello"}],
            max_new_tokens=1,
        )
    except Exception as exc:  # the server still answers from the FAQ
        log.warning("the generator did not load (%s); generated answers fall back to the FAQ or a hand-off", exc)
        print(f"warning: the language model did not load: {exc}", file=sys.stderr)
    timings["warm-up: generator"] = time.perf_counter() - start
    return timings


def serve(
    settings: Settings,
    *,
    demo: bool,
    reset_password: bool = False,
    reset_api_key: bool = False,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Build the engine, load the demo FAQ into an empty knowledge base (``demo``), warm the models
    up, print the URL, and serve until interrupted."""
    import uvicorn

    from chatbot.runtime import apply_threads
    from chatbot.services import build_engine, demo_file
    from knowledge_base.private import restrict_umask

    say = announce or (lambda text: print(text, flush=True))
    apply_threads(settings, serving=True)  # also when called without the CLI (idempotent)
    restrict_umask()  # everything this server writes (data, Gradio's temp files) is the account's alone
    began = time.perf_counter()
    steps: dict[str, float] = {}
    auth = Auth(settings, announce=say, reset_password=reset_password, reset_api_key=reset_api_key)
    host, port = settings.server.host, settings.server.port
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown}:{port}"
    # The port answers at once with a "warming up" page; the real app replaces it when it is built.
    front = WarmingApp()
    engines: list[ChatEngine] = []

    def since_launch() -> str:
        age = _process_age()
        return f"{age:.1f} s after launch" if age is not None else f"{time.perf_counter() - began:.1f} s"

    def build() -> None:
        try:
            engine = build_engine(settings, background=True)  # large uploads: searchable first, refined after
            engines.append(engine)
            engine.handoff.start_worker()  # hand-off notifications (webhook, e-mail) and their retries
            if demo and len(engine.kb) == 0:
                front.stage = "loading the demo FAQ"
                report = engine.kb.add_files([demo_file()])
                say(f"Loaded the demo FAQ (Northwind Goods): {report.total} entries. Add yours in the console.")
            front.stage = "loading the embedder"
            steps.update(warm_up(engine, generator=False))
            steps["knowledge base"] = time.perf_counter() - began
            front.stage = "building the web pages"
            pages_began = time.perf_counter()
            app = create_app(settings, engine, auth=auth)
            steps["web app"] = time.perf_counter() - pages_began
            front.set_app(app)  # FAQ answers from now on; generation joins when warm
            detail = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in steps.items())
            say(f"SupportBot is ready ({since_launch()}; {detail})")
            for line in banner_lines(url):
                say(line)
            verdict = engine.generation.verdict(settings)
            if verdict.on:
                seconds = warm_up(engine, embedder=False)["warm-up: generator"]
                say(f"Generation is warm ({seconds:.1f} s; {since_launch()}).")
            else:
                say(f"Generation is off ({verdict.reason}); answers come from the FAQ.")
        except Exception as exc:  # say why, and stop: a server without its app must not linger
            log.exception("start-up failed")
            say(f"error: SupportBot could not start: {exc}")
            server.should_exit = True

    def listening() -> None:
        say(f"Listening on {url} ({since_launch()}); warming up…")

    # X-Forwarded-For is never trusted by uvicorn itself: `ui.api.client_address` decides (trusted_proxies).
    config = uvicorn.Config(
        front,
        host=host,
        port=port,
        log_level="warning",
        proxy_headers=False,
        # Longer than uvicorn's 5 s: a client reusing a connection just as the server drops it gets a
        # connection error instead of an answer (seen under load with a few seconds between questions).
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
    )
    server = _make_server(config, listening)
    threading.Thread(target=build, name="start-up", daemon=True).start()
    try:
        server.run()
    finally:
        for engine in engines:
            engine.handoff.stop_worker()
            engine.store.close()
            engine.kb.close()


def banner_lines(url: str) -> list[str]:
    """The addresses printed once the port listens (tests/test_urls.py requests every one)."""
    return [f"  chat {url}/   console {url}/admin   API {url}/docs   (Ctrl-C stops it)"]


def _process_age() -> float | None:
    """Seconds since this process started (Linux), so the start time includes Python's imports."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _make_server(config: Any, on_ready: Callable[[], None]) -> Any:
    """uvicorn's server, calling ``on_ready`` once the socket listens (not before)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                on_ready()

    return Server(config)
