"""Who a client is, how often it may ask, and how often it may fail to log in.

* :func:`client_address`: the peer's IP, or the client's behind a trusted reverse proxy
  (``server.trusted_proxies``); a client cannot choose its own bucket with ``X-Forwarded-For``.
* :class:`RateLimiter`: a token bucket per client. One instance guards every way to the engine
  (``/api/chat``, ``/v1/chat/completions``, the chat page's Gradio events, whichever Gradio route
  they arrive by): ``server.rate_limit_per_minute``.
* :class:`LoginThrottle`: failed logins, counted per client and per account, with exponential
  backoff. One instance guards every login path (the console form, HTTP Basic, the API key).

All in memory: one process serves the app.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ACCOUNT_FREE_FAILURES",
    "BACKOFF_BASE_S",
    "BACKOFF_MAX_S",
    "CLIENT_FREE_FAILURES",
    "FORGET_AFTER_S",
    "LoginThrottle",
    "RateLimiter",
    "client_address",
    "parse_addresses",
    "retry_after",
]

log = logging.getLogger(__name__)

#: Failed logins a client may make before it waits (the REST API's historical limit).
CLIENT_FREE_FAILURES = 10
#: Failed logins against one account, from all clients together, before every client waits for it.
ACCOUNT_FREE_FAILURES = 30
#: The first wait after the free failures; each further failure doubles it, up to ``BACKOFF_MAX_S``.
BACKOFF_BASE_S = 30.0
BACKOFF_MAX_S = 900.0
#: A key's failures are forgotten this long after its last one (or at its next successful login).
FORGET_AFTER_S = 900.0


def parse_addresses(text: str) -> frozenset[str]:
    """``"10.0.0.1, 10.0.0.2"`` -> the set of addresses (the format of ``server.trusted_proxies``)."""
    return frozenset(p.strip() for p in text.split(",") if p.strip())


def client_address(request: Any, trusted_proxies: frozenset[str] = frozenset()) -> str:
    """The client's IP: the peer, or, behind a trusted proxy, the last X-Forwarded-For hop it added.

    ``request``: anything with ``client.host`` and ``headers`` (Starlette's or Gradio's request)."""
    client = getattr(request, "client", None)
    peer = str(getattr(client, "host", "") or "unknown")
    return address_from(peer, request.headers, trusted_proxies)


def address_from(peer: str, headers: Mapping[str, str], trusted_proxies: frozenset[str]) -> str:
    if peer not in trusted_proxies:
        return peer
    hops = [h.strip() for h in headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if hop not in trusted_proxies:
            return hop
    return peer


def retry_after(wait: float) -> int:
    """Whole seconds for a ``Retry-After`` header (at least 1)."""
    return max(1, math.ceil(wait))


class RateLimiter:
    """A token bucket per client: ``per_minute`` requests, refilled continuously; 0 disables it.

    In memory (one process serves the app); idle full buckets are dropped so memory stays bounded.
    """

    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def acquire(self, client: str) -> float:
        """Take a token; returns 0 when allowed, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens = self._tokens(client, now)
            if tokens >= 1.0:
                self._buckets[client] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[client] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            if len(self._buckets) > self.MAX_CLIENTS:
                self._prune(now)
        return wait

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` has a token again, without taking one (0 when it has)."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        with self._lock:
            tokens = self._tokens(client, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def _tokens(self, client: str, now: float) -> float:
        """The tokens ``client`` has at ``now``: its bucket refilled since it last changed (hold the lock)."""
        tokens, stamp = self._buckets.get(client, (self.capacity, now))
        return min(self.capacity, tokens + (now - stamp) * self.rate)

    def _prune(self, now: float) -> None:
        full_after = self.capacity / self.rate
        self._buckets = {c: (t, s) for c, (t, s) in self._buckets.items() if now - s < full_after}
        if len(self._buckets) > self.MAX_CLIENTS:  # a flood of distinct clients: start over
            self._buckets.clear()


@dataclass
class _Failures:
    count: int
    last: float
    until: float


class LoginThrottle:
    """Failed logins per client and per account, with exponential backoff.

    A client may fail ``client_free`` times and an account ``account_free`` times (from all
    clients together: a guesser spread over many addresses); after that each failure makes it wait
    ``base_s``, then twice as long, up to ``max_s``. While either waits, :meth:`blocked` says how long
    and the login is refused *before* the credentials are checked, so the right password does not
    work either (it would otherwise tell the guesser that it is right). Failures are forgotten
    ``forget_after_s`` after the last one, or at a successful login of that client and account.
    Every failure and every refusal is logged (client, account, count) — never the password.
    """

    MAX_KEYS = 50_000

    def __init__(
        self,
        *,
        client_free: int = CLIENT_FREE_FAILURES,
        account_free: int = ACCOUNT_FREE_FAILURES,
        base_s: float = BACKOFF_BASE_S,
        max_s: float = BACKOFF_MAX_S,
        forget_after_s: float = FORGET_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_free, self.account_free = client_free, account_free
        self.base_s, self.max_s, self.forget_after_s = base_s, max_s, forget_after_s
        self.clock = clock
        self._failures: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _keys(client: str, account: str | None) -> list[tuple[str, str]]:
        keys = [("client", client)]
        if account:
            keys.append(("account", account.strip().casefold()))
        return keys

    def _free(self, kind: str) -> int:
        return self.client_free if kind == "client" else self.account_free

    def blocked(self, client: str, account: str | None = None) -> float:
        """Seconds ``client`` (and ``account``, when known) must still wait; 0 when it may try."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            for kind, name in self._keys(client, account):
                entry = self._live(f"{kind}:{name}", now)
                if entry is not None:
                    wait = max(wait, entry.until - now)
        if wait > 0:
            log.warning("login refused: %s (account %r) must wait %.0f s after failed logins", client, account, wait)
        return max(wait, 0.0)

    def failure(self, client: str, account: str | None = None, *, path: str = "") -> float:
        """Record a failed login; returns how long the client now has to wait (0: not yet)."""
        now = self.clock()
        wait = 0.0
        with self._lock:
            if len(self._failures) > self.MAX_KEYS:
                self._failures = {k: v for k, v in self._failures.items() if now - v.last < self.forget_after_s}
                if len(self._failures) > self.MAX_KEYS:  # a flood from many addresses: the accounts' counts stay
                    self._failures = {k: v for k, v in self._failures.items() if k.startswith("account:")}
            counts = []
            for kind, name in self._keys(client, account):
                key = f"{kind}:{name}"
                entry = self._live(key, now) or _Failures(0, now, now)
                entry.count += 1
                entry.last = now
                excess = entry.count - self._free(kind)
                if excess >= 0:
                    entry.until = now + min(self.max_s, self.base_s * 2.0 ** min(excess, 30))
                    wait = max(wait, entry.until - now)
                self._failures[key] = entry
                counts.append(f"{kind} {entry.count}")
        log.warning(
            "failed login on %s from %s (account %r; failures: %s)%s",
            path or "?",
            client,
            account,
            ", ".join(counts),
            f"; refused for the next {wait:.0f} s" if wait else "",
        )
        return wait

    def success(self, client: str, account: str | None = None) -> None:
        with self._lock:
            for kind, name in self._keys(client, account):
                self._failures.pop(f"{kind}:{name}", None)

    def _live(self, key: str, now: float) -> _Failures | None:
        """The key's failures, unless forgotten (hold the lock)."""
        entry = self._failures.get(key)
        if entry is not None and now - entry.last >= self.forget_after_s and now >= entry.until:
            del self._failures[key]
            return None
        return entry
