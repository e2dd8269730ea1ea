"""The web app's front door: one ASGI middleware for what no single route can enforce (docs/security.md).

:class:`Guards` holds the shared limits (one chat rate limiter, one login throttle) and the site's
idea of where a request comes from; :class:`SecurityMiddleware` wraps the whole app and

* refuses **cross-site state changes**: a POST/PUT/PATCH/DELETE whose ``Origin`` is another site
  (unless listed in ``server.cors_origins``), or, without ``Origin``, whose ``Sec-Fetch-Site`` says
  ``cross-site``/``same-site``. Browsers send these headers on every cross-origin write (form posts
  included) and scripts cannot forge them; API clients (curl, SDKs) send neither and pass. This
  stands in for a CSRF token: no form posts with the console cookie, Gradio's pages talk by fetch;
* **throttles the console login** (``POST /admin/login``, Gradio's form) with the same
  :class:`~ui.ratelimit.LoginThrottle` as HTTP Basic and the API key: per client and per account,
  before the password is checked;
* makes the **console cookie** ``SameSite=Lax`` (Gradio sets ``SameSite=None``), and ``Secure``
  when the request came over HTTPS (the scheme, or ``X-Forwarded-Proto`` from a trusted proxy);
* refuses **file uploads and file downloads on the public chat page** (``/gradio_api/upload``,
  ``/gradio_api/file=…``): the chat page has no file component; the console's own routes under
  ``/admin`` stay, behind its login;
* gives each chat-page browser a **client cookie** (``sb-client``: 256 random bits, ``HttpOnly``,
  ``SameSite=Lax``) that the conversations it starts are bound to (``ui.chat_page``).

CORS itself is Starlette's ``CORSMiddleware``, always installed by ``ui.server`` (with no origins
unless ``server.cors_origins`` lists some): its mere presence keeps Gradio's own CORS middleware,
which reflects any ``Origin`` under a non-localhost ``Host``, out of the way.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request

from chatbot.settings import Settings
from ui.ratelimit import LoginThrottle, RateLimiter, address_from, parse_addresses, retry_after

__all__ = [
    "CLIENT_COOKIE",
    "CONSOLE_PATH",
    "Guards",
    "SecurityMiddleware",
    "new_client_token",
]

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: The chat page's client cookie: the token its conversations belong to.
CLIENT_COOKIE = "sb-client"
CONSOLE_PATH = "/admin"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Gradio's routes that take or serve files; refused on the public page (the console keeps its own).
PUBLIC_FILE_ROUTES = ("/gradio_api/upload", "/gradio_api/file=", "/gradio_api/file/", "/gradio_api/upload_progress")
#: Gradio's login form posts here (relative to the console's mount).
LOGIN_PATHS = ("/login", "/login/")
MAX_LOGIN_BODY = 64 * 1024
#: Gradio's console cookies (``access-token-<id>``, ``access-token-unsecure-<id>``).
CONSOLE_COOKIE_PREFIX = "access-token"
DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def new_client_token() -> str:
    """256 random bits, URL-safe: a client token (chat-page cookie, API conversation token)."""
    return secrets.token_urlsafe(32)


def _origin_host(origin: str) -> str | None:
    """``https://shop.example:8443`` -> ``shop.example:8443`` (default ports dropped); None if not a URL."""
    try:
        parts = urlsplit(origin.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not host:
        return None
    if ":" in host:  # an IPv6 literal: the Host header keeps its brackets
        host = f"[{host}]"
    if port is not None and str(port) != DEFAULT_PORTS.get(parts.scheme.lower()):
        return f"{host}:{port}".lower()
    return host.lower()


def _plain_host(host: str) -> str:
    host = host.strip().lower()
    for port in (":80", ":443"):
        if host.endswith(port):
            return host[: -len(port)]
    return host


@dataclass
class Guards:
    """The limits every entry point shares, and where a request comes from."""

    chat_limiter: RateLimiter
    logins: LoginThrottle
    trusted_proxies: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    console_path: str = CONSOLE_PATH
    _hosts: frozenset[str] = field(default=frozenset(), init=False)

    def __post_init__(self) -> None:
        self._hosts = frozenset(h for h in (_origin_host(o) for o in self.allowed_origins) if h)

    @classmethod
    def from_settings(cls, settings: Settings) -> Guards:
        return cls(
            chat_limiter=RateLimiter(settings.server.rate_limit_per_minute),
            logins=LoginThrottle(),
            trusted_proxies=parse_addresses(settings.server.trusted_proxies),
            allowed_origins=frozenset(cors_origins(settings)),
        )

    # -- where a request comes from -------------------------------------------------------------
    def client(self, peer: str, headers: Mapping[str, str]) -> str:
        return address_from(peer, headers, self.trusted_proxies)

    def client_of(self, request: Any) -> str:
        """The client address of a Starlette or Gradio request."""
        client = getattr(request, "client", None)
        return self.client(str(getattr(client, "host", "") or "unknown"), request.headers)

    def _forwarded(self, peer: str, headers: Mapping[str, str], name: str) -> str | None:
        if peer in self.trusted_proxies:
            value = headers.get(name, "").split(",")[0].strip()
            return value or None
        return None

    def is_https(self, scope_scheme: str, peer: str, headers: Mapping[str, str]) -> bool:
        """HTTPS to the browser: the request's scheme, or what a trusted proxy says it received."""
        forwarded = self._forwarded(peer, headers, "x-forwarded-proto")
        return (forwarded or scope_scheme).lower() in ("https", "wss")

    def foreign_site(self, peer: str, headers: Mapping[str, str], *, listed_ok: bool = True) -> str | None:
        """Why the request comes from another web site (a browser's cross-site request), or None.

        ``Origin`` decides when present: the site's own host, or (``listed_ok``) an origin in
        ``server.cors_origins``, passes. Without it, ``Sec-Fetch-Site: cross-site/same-site`` is
        refused. A request with neither header is not from a browser page and passes."""
        origin = headers.get("origin")
        if origin is not None:
            origin_host = _origin_host(origin)
            host = self._forwarded(peer, headers, "x-forwarded-host") or headers.get("host", "")
            if origin_host is not None and origin_host == _plain_host(host):
                return None
            if listed_ok and origin.strip().rstrip("/") in self.allowed_origins:
                return None
            return f"Origin {origin!r} is another site"
        fetch_site = headers.get("sec-fetch-site", "").lower()
        if fetch_site in ("cross-site", "same-site"):
            return f"Sec-Fetch-Site is {fetch_site}"
        return None

    def request_foreign_site(self, request: Request, *, listed_ok: bool = True) -> str | None:
        peer = request.client.host if request.client else "unknown"
        return self.foreign_site(peer, request.headers, listed_ok=listed_ok)


def cors_origins(settings: Settings) -> list[str]:
    """``server.cors_origins`` as a list (exact origins, no trailing slash)."""
    return [o.strip().rstrip("/") for o in settings.server.cors_origins.split(",") if o.strip()]


async def _json(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _rewrite_console_cookie(value: str, https: bool) -> str:
    """Gradio's ``SameSite=None; Secure`` console cookie -> ``SameSite=Lax``, ``Secure`` only over HTTPS
    (a Secure cookie set over plain HTTP would be dropped by the browser: the localhost case)."""
    parts = [p.strip() for p in value.split(";")]
    kept = [p for p in parts[1:] if p.lower().split("=")[0] not in ("samesite", "secure")]
    kept.append("SameSite=Lax")
    if https:
        kept.append("Secure")
    return "; ".join([parts[0], *kept])


class SecurityMiddleware:
    """See the module docstring. ``guards``: the shared limits; it wraps the whole app."""

    def __init__(self, app: ASGIApp, guards: Guards) -> None:
        self.app = app
        self.guards = guards

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guards = self.guards
        headers = Headers(scope=scope)
        peer = scope["client"][0] if scope.get("client") else "unknown"
        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        console = path == guards.console_path or path.startswith(guards.console_path + "/")

        if not console and path.startswith(PUBLIC_FILE_ROUTES):
            await _json(
                send,
                403,
                {
                    "error": "Forbidden",
                    "message": "the chat page accepts and serves no files",
                    "fix": "FAQ files go to the console (/admin) or to POST /api/kb/upload with credentials",
                },
            )
            return
        if method in UNSAFE_METHODS:
            why = guards.foreign_site(peer, headers)
            if why is not None:
                log.warning("refused a cross-site %s %s from %s: %s", method, path, guards.client(peer, headers), why)
                await _json(
                    send,
                    403,
                    {
                        "error": "CrossSiteRequest",
                        "message": f"a {method} from another web site is refused ({why})",
                        "fix": "call from the site itself, from a server-side client (no Origin header), "
                        "or list the calling site's origin in server.cors_origins",
                    },
                )
                return

        https = guards.is_https(scope.get("scheme", "http"), peer, headers)
        set_client_cookie = method == "GET" and path == "/" and CLIENT_COOKIE not in _cookies(headers)

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                cookies = out.getlist("set-cookie")
                if any(c.strip().startswith(CONSOLE_COOKIE_PREFIX) for c in cookies):
                    del out["set-cookie"]
                    for cookie in cookies:
                        if cookie.strip().startswith(CONSOLE_COOKIE_PREFIX):
                            cookie = _rewrite_console_cookie(cookie, https)
                        out.append("set-cookie", cookie)
                if set_client_cookie:
                    attributes = "Path=/; HttpOnly; SameSite=Lax" + ("; Secure" if https else "")
                    out.append("set-cookie", f"{CLIENT_COOKIE}={new_client_token()}; {attributes}")
            await send(message)

        if console and method == "POST" and path[len(guards.console_path) :] in LOGIN_PATHS:
            await self._login(scope, receive, send_wrapped, guards.client(peer, headers), path)
            return
        await self.app(scope, receive, send_wrapped)

    async def _login(self, scope: Scope, receive: Receive, send: Send, client: str, path: str) -> None:
        """Gradio's console login, behind the shared login throttle."""
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_LOGIN_BODY:
                await _json(send, 413, {"error": "TooLarge", "message": "the login form is too large", "fix": ""})
                return

        def replay() -> Receive:
            sent = False

            async def receive_again() -> Message:
                nonlocal sent
                if sent:
                    return await receive()
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}

            return receive_again

        try:
            form = await Request(scope, replay()).form()
            account = str(form.get("username") or "").strip() or None
        except Exception:  # a malformed form: Gradio answers it; it is still an attempt
            account = None
        logins = self.guards.logins
        wait = logins.blocked(client, account)
        if wait > 0:
            seconds = retry_after(wait)
            await _json(
                send,
                429,
                {
                    "error": "RateLimited",
                    "message": f"too many failed logins; try again in {seconds} s",
                    "fix": "wait for the Retry-After seconds (docs/security.md: login throttling)",
                },
                {"Retry-After": str(seconds)},
            )
            return
        status: dict[str, int] = {}

        async def observe(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        await self.app(scope, replay(), observe)
        code = status.get("code", 0)
        if code == 200:
            logins.success(client, account)
            log.info("console login of %r from %s", account, client)
        elif code in (400, 401, 403):
            logins.failure(client, account, path=path)


def _cookies(headers: Headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for header in headers.getlist("cookie"):
        for pair in header.split(";"):
            name, _, value = pair.strip().partition("=")
            if name:
                out[name] = value
    return out
