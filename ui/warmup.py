"""The port answers in seconds: a "warming up" page until the real app is ready (#15 item 8).

`supportbot serve` starts uvicorn on :class:`WarmingApp` at once and builds the engine, the
knowledge base and the Gradio pages in a background thread. Until then every request gets HTTP 503
with ``Retry-After`` and a small page that reloads itself (JSON for ``/api`` and ``/v1``); then the
real app's lifespan runs (Gradio's start-up) and every request goes to it. Generation joins later:
the generator warms up after the app is live, and ``faq`` answers never wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from typing import Any

__all__ = ["WARMING_PAGE", "WarmingApp"]

WARMING_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>SupportBot is starting</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><meta http-equiv="refresh" content="2">
</head><body style="font-family: system-ui, sans-serif; max-width: 36rem; margin: 3rem auto; padding: 0 1rem">
<h1>Warming up…</h1><p>SupportBot is starting ({stage}). This page reloads by itself in a moment.</p>
</body></html>"""


class WarmingApp:
    """An ASGI app that answers "warming up" until :meth:`set_app` hands it the real one."""

    def __init__(self) -> None:
        self.stage = "loading the knowledge base"
        self._pending: Any = None
        self._app: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._lock: asyncio.Lock | None = None
        self._set = threading.Event()

    def set_app(self, app: Any) -> None:
        """The real app (a Starlette/FastAPI app); it serves from the next request on."""
        self._pending = app
        self._set.set()

    @property
    def ready(self) -> bool:
        return self._app is not None

    async def _real(self) -> Any:
        if self._app is not None or self._pending is None:
            return self._app
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if self._app is None:
                stack = contextlib.AsyncExitStack()
                app = self._pending
                router = getattr(app, "router", None)
                if router is not None and getattr(router, "lifespan_context", None) is not None:
                    await stack.enter_async_context(router.lifespan_context(app))
                self._stack, self._app = stack, app
        return self._app

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._stack is not None:
                    await self._stack.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        app = await self._real()
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1013})  # try again later
            return
        path = str(scope.get("path", ""))
        if path.startswith(("/api", "/v1")):
            body = json.dumps(
                {
                    "error": "starting",
                    "message": f"SupportBot is starting ({self.stage})",
                    "fix": "retry in a few seconds",
                }
            ).encode()
            kind = b"application/json"
        else:
            body, kind = WARMING_PAGE.replace("{stage}", self.stage).encode(), b"text/html; charset=utf-8"
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [(b"content-type", kind), (b"retry-after", b"2"), (b"cache-control", b"no-store")],
            }
        )
        await send({"type": "http.response.body", "body": body})
