"""Logins for the team console and the write API: hashed credentials, never a built-in default.

Two credentials guard everything that changes the bot or reads customers' conversations:

- the **admin login** (``server.admin_user`` + a password), for the console at ``/admin`` (Gradio's
  own login page) and, as HTTP Basic, for the API;
- the **API key**, sent as ``Authorization: Bearer <key>`` to the knowledge-base endpoints (and to
  ``/v1`` when ``server.api_key`` is configured).

Passwords are stored as ``pbkdf2_sha256$<iterations>$<salt>$<hash>`` (hashlib only; the salt and
hash are URL-safe base64 without padding). ``server.admin_password_hash`` takes such a string; when it
is empty, the first start generates a random password, stores only its hash in
``<data_dir>/admin.json`` (atomic write, mode 0600) and prints the password once. The same happens for
the API key when ``server.api_key`` is empty (stored as ``sha256$<hex>``: the key is 256 random bits,
so a slow hash adds nothing). ``supportbot serve --reset-password`` / ``--reset-api-key`` make new ones.

Every comparison is constant-time (:func:`hmac.compare_digest`). A verified Basic login is remembered
for a few minutes under a keyed digest, so API clients that send it with every request do not pay the
PBKDF2 cost (about half a second on a small CPU) each time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool

from chatbot.settings import Settings
from knowledge_base.atomic import atomic_path
from knowledge_base.errors import SupportBotError

__all__ = [
    "ADMIN_FILE",
    "PBKDF2_ITERATIONS",
    "Auth",
    "generate_api_key",
    "generate_password",
    "hash_api_key",
    "hash_password",
    "verify_api_key",
    "verify_password",
]

ADMIN_FILE = "admin.json"
#: OWASP's 2023 recommendation for PBKDF2-HMAC-SHA256.
PBKDF2_ITERATIONS = 600_000
SCHEME = "pbkdf2_sha256"
KEY_SCHEME = "sha256"
#: How long a verified Basic login is remembered (seconds).
LOGIN_CACHE_S = 300.0
LOGIN_CACHE_MAX = 256

Announce = Callable[[str], None]

_CONFIGURED_HASH = "the admin password comes from server.admin_password_hash, so a generated one would be ignored"
_CONFIGURED_HASH_FIX = (
    "put a new hash from `supportbot serve --hash-password` there, or remove the setting and reset again"
)
_CONFIGURED_KEY = "the API key comes from server.api_key, so a generated one would be ignored"
_CONFIGURED_KEY_FIX = "change server.api_key, or remove it and reset again"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """``pbkdf2_sha256$iterations$salt$hash`` for ``password`` (a fresh 16-byte salt unless given)."""
    if not password:
        raise SupportBotError("the password is empty", fix="choose a password of at least 12 characters")
    if iterations < 1:
        raise SupportBotError(f"{iterations} PBKDF2 iterations", fix=f"use at least {PBKDF2_ITERATIONS}")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return f"{SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def _parse_password_hash(encoded: str) -> tuple[int, bytes, bytes] | None:
    parts = encoded.strip().split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        return None
    try:
        iterations = int(parts[1])
        salt, digest = _unb64(parts[2]), _unb64(parts[3])
    except ValueError:
        return None
    if iterations < 1 or not salt or len(digest) != 32:
        return None
    return iterations, salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded`` (False for a malformed hash, never an exception)."""
    parsed = _parse_password_hash(encoded)
    if parsed is None:
        return False
    iterations, salt, expected = parsed
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(digest, expected)


def hash_api_key(key: str) -> str:
    return f"{KEY_SCHEME}${hashlib.sha256(key.encode('utf-8')).hexdigest()}"


def verify_api_key(key: str, stored: str) -> bool:
    return hmac.compare_digest(hash_api_key(key).encode("ascii"), stored.encode("ascii", "replace"))


def generate_password() -> str:
    """16 URL-safe characters (96 random bits): typed by a person, guessed by nobody."""
    return secrets.token_urlsafe(12)


def generate_api_key() -> str:
    return "sb-" + secrets.token_urlsafe(32)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class _Stored:
    """The contents of ``admin.json``: hashes only, never a secret in clear."""

    password_hash: str = ""
    api_key_hash: str = ""
    created_at: str = ""
    updated_at: str = ""

    @classmethod
    def read(cls, path: Path) -> _Stored:
        try:
            data: Any = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise SupportBotError(
                f"{path} is unreadable ({exc})",
                fix=f"delete {path} and restart: a new admin password and API key are generated and printed",
            ) from exc
        if not isinstance(data, dict):
            data = {}
        return cls(**{k: str(data.get(k, "")) for k in ("password_hash", "api_key_hash", "created_at", "updated_at")})

    def write(self, path: Path) -> None:
        self.created_at = self.created_at or _now()
        self.updated_at = _now()
        text = json.dumps(self.__dict__, indent=2) + "\n"
        with atomic_path(path) as tmp:
            # mkstemp already creates the file 0600; say so explicitly, the file holds credentials.
            os.chmod(tmp, 0o600)
            tmp.write_text(text, encoding="utf-8")


class Auth:
    """The server's credentials, loaded (or created on first start) from the settings and data dir.

    ``announce`` receives the one-time messages carrying a newly generated password or API key;
    it defaults to :func:`print`. Nothing else ever sees a secret in clear. ``reset_password`` /
    ``reset_api_key`` replace the stored ones (``supportbot serve --reset-password``).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        announce: Announce | None = None,
        iterations: int = PBKDF2_ITERATIONS,
        reset_password: bool = False,
        reset_api_key: bool = False,
    ) -> None:
        self.user = settings.server.admin_user
        self.path = settings.data_dir / ADMIN_FILE
        self.iterations = iterations
        self._announce: Announce = announce or (lambda text: print(text, flush=True))
        self._configured_hash = settings.server.admin_password_hash.strip()
        self._configured_key = settings.server.api_key
        self._cache_key = secrets.token_bytes(32)
        self._verified: dict[bytes, float] = {}
        self._lock = threading.Lock()
        if self._configured_hash and _parse_password_hash(self._configured_hash) is None:
            raise SupportBotError(
                "server.admin_password_hash is not a pbkdf2_sha256$iterations$salt$hash string",
                fix="generate one with `supportbot serve --hash-password`, or leave it empty to get a generated password",
            )
        if not self.user:
            raise SupportBotError("server.admin_user is empty", fix="set a user name, e.g. admin")
        self._stored = _Stored.read(self.path)
        if reset_password and self._configured_hash:
            raise SupportBotError(_CONFIGURED_HASH, fix=_CONFIGURED_HASH_FIX)
        if reset_api_key and self._configured_key:
            raise SupportBotError(_CONFIGURED_KEY, fix=_CONFIGURED_KEY_FIX)
        created: list[str] = []
        if not self._configured_hash and (reset_password or not self._stored.password_hash):
            created.append(self._new_password())
        if not self._configured_key and (reset_api_key or not self._stored.api_key_hash):
            created.append(self._new_api_key())
        if created:
            self._stored.write(self.path)
            for message in created:
                self._announce(message)

    # -- creating -------------------------------------------------------------------------------
    def _new_password(self) -> str:
        password = generate_password()
        self._stored.password_hash = hash_password(password, iterations=self.iterations)
        with self._lock:
            self._verified.clear()
        return (
            f"Console login for {self.user!r}: {password}\n"
            f"  (shown once; only its hash is stored in {self.path}. "
            "New one: supportbot serve --reset-password)"
        )

    def _new_api_key(self) -> str:
        key = generate_api_key()
        self._stored.api_key_hash = hash_api_key(key)
        return (
            f"API key for /api/kb: {key}\n"
            f"  (send 'Authorization: Bearer <key>'; shown once, only its hash is stored in {self.path}. "
            "New one: supportbot serve --reset-api-key)"
        )

    def reset_password(self) -> None:
        """A new random admin password, stored hashed and announced once."""
        if self._configured_hash:
            raise SupportBotError(_CONFIGURED_HASH, fix=_CONFIGURED_HASH_FIX)
        message = self._new_password()
        self._stored.write(self.path)
        self._announce(message)

    def reset_api_key(self) -> None:
        """A new random API key, stored hashed and announced once."""
        if self._configured_key:
            raise SupportBotError(_CONFIGURED_KEY, fix=_CONFIGURED_KEY_FIX)
        message = self._new_api_key()
        self._stored.write(self.path)
        self._announce(message)

    # -- checking -------------------------------------------------------------------------------
    @property
    def password_hash(self) -> str:
        return self._configured_hash or self._stored.password_hash

    @property
    def v1_key_required(self) -> bool:
        """``/v1`` is open unless the operator configured ``server.api_key`` explicitly."""
        return bool(self._configured_key)

    def check_password(self, user: str, password: str) -> bool:
        """The admin login; slow (PBKDF2) the first time, remembered for a few minutes after."""
        user_ok = hmac.compare_digest(user.encode("utf-8"), self.user.encode("utf-8"))
        encoded = self.password_hash
        token = hmac.new(self._cache_key, f"{user}\0{password}\0{encoded}".encode(), hashlib.sha256).digest()
        now = time.monotonic()
        with self._lock:
            expires = self._verified.get(token)
        if expires is not None and expires > now:
            return True
        # Always run the hash, so a wrong user name costs as long as a wrong password.
        ok = verify_password(password, encoded) and user_ok
        if ok:
            with self._lock:
                if len(self._verified) >= LOGIN_CACHE_MAX:
                    self._verified = {k: v for k, v in self._verified.items() if v > now}
                    if len(self._verified) >= LOGIN_CACHE_MAX:
                        self._verified.clear()
                self._verified[token] = now + LOGIN_CACHE_S
        return ok

    async def gradio_login(self, user: str, password: str) -> bool:
        """For ``gr.mount_gradio_app(auth=...)``: the hash runs in a thread, not on the event loop."""
        return await run_in_threadpool(self.check_password, user, password)

    def check_api_key(self, key: str) -> bool:
        if not key:
            return False
        if self._configured_key:
            return hmac.compare_digest(key.encode("utf-8"), self._configured_key.encode("utf-8"))
        return bool(self._stored.api_key_hash) and verify_api_key(key, self._stored.api_key_hash)
