"""The HTTP API (contract: ../shared/DESIGN.md, "HTTP contract"): chat, feedback, the knowledge base,
conversation export, health, and an OpenAI-compatible ``/v1``.

Routes only translate HTTP to engine calls and back; the engine is synchronous, so every call runs in
a worker thread (a dedicated pool, large enough that ``faq`` answers never queue behind requests
waiting for a generation slot) and the event loop never blocks.

| route | auth |
|---|---|
| ``POST /api/chat`` (JSON, or SSE with ``"stream": true``), ``POST /api/feedback`` | none; chat is rate-limited per client |
| ``GET /api/suggestions``, ``GET /api/health`` | none |
| ``POST /api/handoff/contact``, ``POST /api/handoff/replies`` (``ui.api_handoff``) | the conversation's token |
| ``GET/POST /api/kb/entries``, ``GET/PUT/DELETE /api/kb/entries/{id}``, ``POST /api/kb/upload``, ``GET /api/kb/search``, ``GET /api/kb/held``, ``POST /api/kb/entries/{id}/approve`` | API key or admin login |
| ``GET/POST /api/kb/examples``, ``DELETE /api/kb/examples/{id}`` (labelled examples) | API key or admin login |
| ``GET /api/conversations/export.csv``, ``GET /api/conversations/examples.csv`` | API key or admin login |
| ``POST /v1/chat/completions``, ``GET /v1/models`` | none, or the API key when ``server.api_key`` is set |

Entry ids may contain ``/``: the ``{id}`` segment takes the rest of the path (``{id:path}``), so
``PUT /api/kb/entries/shipping/eu-01`` edits entry ``shipping/eu-01``; percent-encoding
(``shipping%2Feu-01``) works too.

Credentials: ``Authorization: Bearer <api key>``, or HTTP Basic with the console login. Errors are
JSON ``{"error", "message", "fix"}`` (plus ``"problems"``, row by row, for a rejected upload).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatbot import learning
from chatbot.engine import MAX_MESSAGE_CHARS
from chatbot.settings import Settings
from knowledge_base.entry import content_id, normalize_text
from knowledge_base.errors import IngestError, ModelLoadError, NotFoundError, ProblemsError, SupportBotError
from ui.api_handoff import add_handoff_routes
from ui.auth import Auth
from ui.ratelimit import RateLimiter, client_address, retry_after
from ui.security import Guards, new_client_token

if TYPE_CHECKING:
    from chatbot.engine import Answer, ChatEngine, StreamEvent

__all__ = ["ApiError", "RateLimiter", "add_api", "client_address"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: JSON bodies (chat, entries) are small; uploads get ``kb.max_upload_mb``.
MAX_JSON_BODY = 1024 * 1024
#: Multipart framing around an uploaded file.
MULTIPART_OVERHEAD = 64 * 1024
#: Worker threads for engine calls: generation requests hold one while they wait for a slot.
ENGINE_THREADS = 256
MAX_COMMENT_CHARS = 2000
DEFAULT_MODEL_ID = "supportbot"
#: No caching, and no buffering by reverse proxies (nginx), so chunks reach the browser as written.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _OptionalBasic(HTTPBasic):
    """HTTP Basic that yields None for a malformed header too, so every failure gets the same 401."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:  # type: ignore[override]
        try:
            return await super().__call__(request)
        except StarletteHTTPException:
            return None


BEARER = HTTPBearer(auto_error=False, description="the API key")
BASIC = _OptionalBasic(auto_error=False, description="the console login", realm="SupportBot")


# ------------------------------------------------------------------------------------------------
# Errors


class ApiError(Exception):
    """An HTTP error with the API's JSON shape ``{"error", "message", "fix"}``."""

    def __init__(
        self, status: int, error: str, message: str, fix: str = "", *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.fix = status, error, message, fix
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.error, "message": self.message, "fix": self.fix}


def _status_of(exc: SupportBotError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ProblemsError):
        return 422
    if isinstance(exc, ModelLoadError):
        return 503
    return 400


def _error_body(exc: SupportBotError) -> dict[str, Any]:
    body = exc.to_dict()
    if isinstance(exc, IngestError):
        body["fix"] = "fix the problems listed (row by row) and upload again; nothing was stored"
    elif isinstance(exc, ProblemsError):
        body["fix"] = "fix the problems listed and try again"
    body.setdefault("fix", "")
    return body


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "the request is invalid"


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    except ValueError:
        return "HTTPError"


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)

    async def on_supportbot_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, SupportBotError)
        return JSONResponse(_error_body(exc), status_code=_status_of(exc))

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        body = {
            "error": "ValidationError",
            "message": _validation_message(exc),
            "fix": "see the request schema at /docs",
            "detail": json.loads(json.dumps(exc.errors(), default=str)),
        }
        return JSONResponse(body, status_code=422)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        fixes = {
            413: "send a smaller request (uploads: kb.max_upload_mb)",
            404: "see /docs for the routes",
            405: "see /docs for the methods each route takes",
        }
        body = {
            "error": "TooLarge" if exc.status_code == 413 else _phrase(exc.status_code),
            "message": str(exc.detail),
            "fix": fixes.get(exc.status_code, ""),
        }
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(SupportBotError, on_supportbot_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


# ------------------------------------------------------------------------------------------------
# Clients and rate limiting


def _too_many(wait: float, what: str, fix: str = "server.rate_limit_per_minute sets the limit") -> ApiError:
    seconds = retry_after(wait)
    return ApiError(
        429,
        "RateLimited",
        f"too many {what} from this client; try again in {seconds} s",
        f"wait for the Retry-After seconds ({fix})",
        headers={"Retry-After": str(seconds)},
    )


#: The account name the API key counts under in the login throttle.
API_KEY_ACCOUNT = "api-key"
LOGIN_LIMIT_FIX = "failed logins are throttled per client and per account: docs/security.md"


# ------------------------------------------------------------------------------------------------
# Request and response bodies


def _check_message(value: str) -> str:
    if not value.strip():
        raise ValueError("the message is empty: send the customer's question")
    if len(value) > MAX_MESSAGE_CHARS:
        raise ValueError(f"the message has {len(value)} characters; the limit is {MAX_MESSAGE_CHARS}")
    return value


class ChatRequest(BaseModel):
    message: str = Field(
        description=f"The customer's message (1-{MAX_MESSAGE_CHARS} characters).",
        json_schema_extra={"minLength": 1, "maxLength": MAX_MESSAGE_CHARS},
        examples=["How do I return an item?"],
    )
    conversation_id: str | None = Field(
        None, description="Continue this conversation (from an earlier answer); omit to start one."
    )
    conversation_token: str | None = Field(
        None,
        description="The secret returned with the conversation's first answer; required with conversation_id.",
    )
    debug: bool = Field(
        False, description="Add the policy's scores and reason (needs the API key or the console login)."
    )
    stream: bool = Field(
        False,
        description='Server-sent events: `data: {"delta": "..."}` chunks, then `data: {"done": true, ...answer}`.',
    )

    @field_validator("message")
    @classmethod
    def _message_length(cls, value: str) -> str:
        return _check_message(value)


class Citation(BaseModel):
    model_config = ConfigDict(extra="allow")  # `score` with debug

    id: str
    question: str
    answer: str


class ClarifyOption(BaseModel):
    id: str
    question: str


class ChatResponse(BaseModel):
    """The answer with its conversation and message ids (rate it with /api/feedback). Public: no
    scores or thresholds, unless ``debug`` with credentials adds ``scores`` and ``reason``."""

    model_config = ConfigDict(extra="allow")

    answer: str
    mode: Literal["faq", "clarify", "generated", "handoff"]
    sources: list[str] = Field(description="FAQ entry ids, best first")
    latency_ms: float
    conversation_id: str
    conversation_token: str = Field(
        description="Secret of this conversation: send it with conversation_id to continue or rate it"
    )
    message_id: int
    options: list[ClarifyOption] = Field(default_factory=list, description='"did you mean" choices (mode clarify)')
    citations: list[Citation] = Field(default_factory=list, description="the cited entries, for display")
    question: str = Field("", description="the question as resolved (follow-ups rewritten)")
    model: str | None = None
    adapter: str | None = None


class FeedbackRequest(BaseModel):
    message_id: int = Field(ge=1, le=2**63 - 1, description="`message_id` of the answer being rated")
    conversation_token: str = Field(description="the `conversation_token` of the answer's conversation")
    rating: Literal["up", "down"]
    comment: str = Field("", max_length=MAX_COMMENT_CHARS)


class FeedbackResponse(BaseModel):
    ok: bool = True
    message_id: int
    rating: str


class EntryBody(BaseModel):
    """A new FAQ entry; validated like a row of an uploaded file. Without ``id`` one is derived from the question."""

    id: str | None = Field(None, description="stable id; an existing id is updated in place")
    question: str
    answer: str
    alt_questions: list[str] = Field(default_factory=list, description="other phrasings of the question")
    category: str = ""
    tags: list[str] = Field(default_factory=list)
    enabled: bool = True


class EntryPatch(BaseModel):
    """Fields to change; the others keep their values."""

    model_config = ConfigDict(extra="forbid")

    question: str | None = None
    answer: str | None = None
    alt_questions: list[str] | None = None
    category: str | None = None
    tags: list[str] | None = None
    enabled: bool | None = None


class Entry(BaseModel):
    id: str
    question: str
    alt_questions: list[str]
    answer: str
    category: str
    tags: list[str]
    enabled: bool
    source: str
    created_at: str
    updated_at: str
    hits: int


class EntryList(BaseModel):
    entries: list[Entry]
    total: int


class EntryWritten(BaseModel):
    entry: Entry
    created: bool


class Removed(BaseModel):
    removed: list[str]


class UploadReport(BaseModel):
    added: int
    updated: int
    unchanged: int
    total: int
    skipped: list[dict[str, str]] = Field(default_factory=list, description="bad rows left out (skip_bad_rows)")
    added_ids: list[str] = Field(default_factory=list)
    updated_ids: list[str] = Field(default_factory=list)
    answers_pending: int = Field(
        0, description="entries searchable by their questions, whole-entry vectors still embedding in the background"
    )
    held: list[dict[str, str]] = Field(
        default_factory=list, description="stored but held for review, never served until approved: id and reason"
    )


class HeldEntry(Entry):
    reason: str


class HeldList(BaseModel):
    held: list[HeldEntry]


class Approved(BaseModel):
    approved: list[str]


class ExampleBody(BaseModel):
    """A resolved customer question: ``query`` is answered by entry ``faq_id`` (or, with
    ``positive`` false, was wrongly answered by it). Redacted like the conversation log."""

    query: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    faq_id: str = Field(min_length=1, description="the entry that answers it")
    positive: bool = True
    conversation_id: str | None = None
    message_id: int | None = None


class Example(BaseModel):
    id: int
    query: str
    entry_id: str
    source: str
    positive: bool
    created_at: float
    conversation_id: str | None = None
    message_id: int | None = None


class ExampleList(BaseModel):
    examples: list[Example]
    total: int


class ExamplesRemoved(BaseModel):
    removed: int


class SearchResult(BaseModel):
    id: str
    question: str
    answer: str
    score: float
    category: str
    matched: str | None = None


class SearchResponse(BaseModel):
    query: str
    results: list[SearchResult]


class Health(BaseModel):
    status: str
    entries: int
    model: str
    embedding_model: str
    generation_concurrency: int


class Suggestions(BaseModel):
    questions: list[str]


class ErrorBody(BaseModel):
    error: str
    message: str
    fix: str = ""


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content if p.get("type", "text") == "text")
        return ""


class ChatCompletionRequest(BaseModel):
    """OpenAI's request; sampling knobs are accepted and ignored (the server's settings decide)."""

    model_config = ConfigDict(extra="allow")

    model: str = DEFAULT_MODEL_ID
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    user: str | None = Field(None, description="the end user's id (keeps customers' conversations apart)")
    conversation_id: str | None = Field(
        None, description="SupportBot extension: continue this conversation instead of matching the history"
    )
    conversation_token: str | None = Field(
        None, description="SupportBot extension: the conversation's secret, required with conversation_id"
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    422: {"model": ErrorBody},
}
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, 401: {"model": ErrorBody}, 404: {"model": ErrorBody}}


# ------------------------------------------------------------------------------------------------
# Helpers


def _chat_json(answer: Answer, token: str, *, debug: bool = False) -> dict[str, Any]:
    """The public answer (``answer``, not ``text``; no scores or reason) with the engine's ids,
    options, citations and the conversation's token; ``debug`` keeps the policy's internals."""
    data = answer.to_dict() if debug else answer.public_dict()
    data["answer"] = data.pop("text")
    data["conversation_token"] = token
    return data


def _conversation_owner(conversation_id: str | None, token: str | None) -> str:
    """The owner token of a chat request: a new one for a new conversation; the given one to
    continue (a missing token gets the engine's uniform "not yours" error, like a wrong one)."""
    if conversation_id is None:
        return new_client_token()
    return token or ""


def _sse(payload: Any) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _approx_tokens(text: str) -> int:
    return len(text) // 4 + 1 if text else 0


def _history_key(messages: Sequence[tuple[str, str]]) -> str:
    blob = json.dumps([[r, " ".join(t.split())] for r, t in messages], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ConversationMap:
    """Finds the conversation an OpenAI-style request continues.

    OpenAI clients resend the whole history each turn. After answering, the history including the
    answer is remembered (hashed, with the client's address and the request's ``user``) with its
    conversation id and token; the next request from that client whose earlier messages hash the same
    continues that conversation, so the store holds each turn once and follow-ups resolve. Each
    remembered history is continued once: a second customer who happens to send the same words gets
    a conversation of their own. An unknown history (a restart, an edited transcript) starts a new
    conversation.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._map: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(scope: str, history: Sequence[tuple[str, str]]) -> str:
        return _history_key([("scope", scope), *history])

    def take(self, scope: str, history: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
        """``(conversation_id, conversation_token)`` of the conversation ``history`` continues."""
        if not history:
            return None
        with self._lock:
            return self._map.pop(self._key(scope, history), None)

    def remember(self, scope: str, history: Sequence[tuple[str, str]], conversation_id: str, token: str) -> None:
        key = self._key(scope, history)
        with self._lock:
            self._map[key] = (conversation_id, token)
            while len(self._map) > self.size:
                self._map.popitem(last=False)


# ------------------------------------------------------------------------------------------------
# The routes


def add_api(app: FastAPI, settings: Settings, engine: ChatEngine, auth: Auth, guards: Guards | None = None) -> None:
    """Add the ``/api`` and ``/v1`` routes, error handlers and limits to ``app``. ``guards``: the
    chat rate limiter and login throttle shared with the rest of the app (``ui.server``)."""
    _install_error_handlers(app)
    guards = guards or Guards.from_settings(settings)
    proxies = guards.trusted_proxies
    chat_limiter = guards.chat_limiter
    logins = guards.logins
    conversations = ConversationMap()
    upload_limit = int(settings.kb.max_upload_mb * 1024 * 1024)  # the loaders' own limit: one knob
    state: dict[str, anyio.CapacityLimiter] = {}

    def threads() -> anyio.CapacityLimiter:
        if "limiter" not in state:
            state["limiter"] = anyio.CapacityLimiter(ENGINE_THREADS)
        return state["limiter"]

    async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=threads())

    async def iterate(events: Iterator[StreamEvent]) -> AsyncIterator[StreamEvent]:
        done = object()
        try:
            while True:
                item = await anyio.to_thread.run_sync(next, events, done, limiter=threads())
                if item is done:
                    return
                yield item  # type: ignore[misc]
        finally:
            # The client went away or the stream ended: close the engine's generator, which frees
            # its generation slot and stops the model at the next token.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(events.close)  # type: ignore[attr-defined]

    # -- dependencies ---------------------------------------------------------------------------
    async def rate_limited(request: Request) -> None:
        wait = chat_limiter.acquire(client_address(request, proxies))
        if wait > 0:
            raise _too_many(wait, "chat requests")

    unauthorized_headers = {"WWW-Authenticate": 'Bearer, Basic realm="SupportBot"'}

    async def staff(
        request: Request,
        token: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        login: Annotated[HTTPBasicCredentials | None, Depends(BASIC)],
    ) -> str:
        """The API key (Bearer) or the admin login (Basic); returns who it is. Both go through the
        shared login throttle (per client and per account); Basic is refused from other web sites,
        whose requests a browser would sign with the remembered login (CSRF)."""
        client = client_address(request, proxies)
        bearer = token is not None and token.scheme.lower() == "bearer"
        account = API_KEY_ACCOUNT if bearer else login.username if login is not None else None
        wait = logins.blocked(client, account)
        if wait > 0:
            raise _too_many(wait, "failed logins", LOGIN_LIMIT_FIX)
        if login is not None and not bearer:
            foreign = guards.request_foreign_site(request, listed_ok=False)
            if foreign is not None:
                raise ApiError(
                    403,
                    "CrossSiteRequest",
                    f"the console login is not accepted from another web site ({foreign})",
                    "call from the site itself or a server-side client, or use the API key (Bearer)",
                )
        if bearer and token is not None:
            if auth.check_api_key(token.credentials):
                logins.success(client, account)
                return "api-key"
        elif login is not None and await call(auth.check_password, login.username, login.password):
            logins.success(client, account)
            return login.username
        if token is not None or login is not None or request.headers.get("authorization"):
            logins.failure(client, account, path=request.url.path)
            raise ApiError(
                401,
                "Unauthorized",
                "the API key or login is wrong",
                "send 'Authorization: Bearer <api key>' or the console login (HTTP Basic)",
                headers=unauthorized_headers,
            )
        raise ApiError(
            401,
            "Unauthorized",
            "this endpoint needs the API key or the console login",
            "send 'Authorization: Bearer <api key>' (printed at first start; `supportbot serve --reset-api-key` "
            "makes a new one) or the console login as HTTP Basic",
            headers=unauthorized_headers,
        )

    async def v1_key(request: Request, token: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if not auth.v1_key_required:
            return
        client = client_address(request, proxies)
        wait = logins.blocked(client, API_KEY_ACCOUNT)
        if wait > 0:
            raise _too_many(wait, "failed logins", LOGIN_LIMIT_FIX)
        if token is not None and auth.check_api_key(token.credentials):
            logins.success(client, API_KEY_ACCOUNT)
            return
        if token is not None:
            logins.failure(client, API_KEY_ACCOUNT, path=request.url.path)
        raise ApiError(
            401,
            "Unauthorized",
            "this server requires the API key on /v1",
            "send 'Authorization: Bearer <server.api_key>' (the api_key of OpenAI clients)",
            headers={"WWW-Authenticate": "Bearer"},
        )

    # -- chat -----------------------------------------------------------------------------------
    public = APIRouter(prefix="/api", tags=["chat"], max_body_size=MAX_JSON_BODY)

    @public.post(
        "/chat",
        response_model=ChatResponse,
        dependencies=[Depends(rate_limited)],
        responses={
            **ERRORS,
            200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream is true"},
            404: {"model": ErrorBody, "description": "no conversation with this id and token"},
            429: {"model": ErrorBody, "description": "rate limit; see Retry-After"},
        },
        summary="Ask the bot",
    )
    async def chat(
        body: ChatRequest,
        request: Request,
        token: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        login: Annotated[HTTPBasicCredentials | None, Depends(BASIC)],
    ) -> Any:
        """One customer turn through the whole pipeline: the answer, its mode, sources and citations,
        ``conversation_id`` with ``conversation_token`` (send both back to continue or rate it) and
        ``message_id`` (for feedback). ``debug`` (with the API key or the console login) adds the
        policy's scores and reason."""
        if body.debug:
            await staff(request, token, login)
        owner = _conversation_owner(body.conversation_id, body.conversation_token)
        if body.conversation_id is not None:  # before a stream starts, so that it is a plain 404
            await call(engine.check_owner, body.conversation_id, owner)
        if body.stream:
            events = engine.answer_stream(body.message, body.conversation_id, client="api", owner=owner)

            async def stream() -> AsyncIterator[bytes]:
                try:
                    async for event in iterate(events):
                        if event.kind == "delta" and event.text:
                            yield _sse({"delta": event.text})
                        elif event.kind == "done" and event.answer is not None:
                            yield _sse({"done": True, **_chat_json(event.answer, owner, debug=body.debug)})
                except SupportBotError as exc:
                    yield _sse({"done": True, **_error_body(exc)})
                except Exception:  # the response has started: report in-band, then end the stream
                    log.exception("chat stream failed")
                    yield _sse(
                        {
                            "done": True,
                            "error": "InternalError",
                            "message": "the answer failed",
                            "fix": "see the server log",
                        }
                    )

            return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
        answer = await call(engine.answer, body.message, body.conversation_id, client="api", owner=owner)
        return _chat_json(answer, owner, debug=body.debug)

    @public.post("/feedback", response_model=FeedbackResponse, responses={**ERRORS, 404: {"model": ErrorBody}})
    async def feedback(body: FeedbackRequest) -> FeedbackResponse:
        """Thumbs up or down on an answer of your own conversation (its ``conversation_token``);
        a thumbs-down queues the question for the support team."""
        await call(engine.feedback, body.message_id, body.rating, body.comment, owner=body.conversation_token)
        return FeedbackResponse(message_id=body.message_id, rating=body.rating)

    @public.get("/suggestions", response_model=Suggestions)
    async def suggestions(n: Annotated[int, Query(ge=1, le=20)] = 4) -> Suggestions:
        """The most asked questions, for a chat widget's empty state."""
        return Suggestions(questions=await call(engine.suggested_questions, n))

    @public.get("/health", response_model=Health, tags=["status"])
    async def health() -> Health:
        entries = await call(len, engine.kb)
        return Health(
            status="ok",
            entries=entries,
            model=settings.model.model,
            embedding_model=engine.kb.embedder.name,
            generation_concurrency=settings.server.generation_concurrency,
        )

    # -- knowledge base -------------------------------------------------------------------------
    kb_routes = APIRouter(
        prefix="/api/kb", tags=["knowledge base"], dependencies=[Depends(staff)], max_body_size=MAX_JSON_BODY
    )

    @kb_routes.get("/entries", response_model=EntryList, responses=AUTH_ERRORS)
    async def list_entries(
        category: str | None = None,
        enabled: bool | None = None,
        q: Annotated[str | None, Query(description="substring of a question, phrasing or answer")] = None,
    ) -> dict[str, Any]:
        entries = await call(engine.kb.entries, category=category)
        if enabled is not None:
            entries = [e for e in entries if e.enabled == enabled]
        if q:
            needle = q.casefold()
            entries = [e for e in entries if needle in " ".join([*e.questions, e.answer]).casefold()]
        return {"entries": [e.to_dict() for e in entries], "total": len(entries)}

    @kb_routes.post("/entries", response_model=EntryWritten, status_code=201, responses=AUTH_ERRORS)
    async def create_entry(body: EntryBody) -> dict[str, Any]:
        """Add an entry (validated like an uploaded row); an existing ``id`` is updated in place.
        Live in the chat at once."""
        record = body.model_dump(exclude_none=True)
        data = json.dumps([record], ensure_ascii=False).encode("utf-8")
        report = await call(engine.kb.add_bytes, data, "api.json")
        # Unchanged entries are in neither list: the id is the given one, or the one derived from the question.
        written = report.added_ids or report.updated_ids
        entry_id = written[0] if written else body.id or content_id(normalize_text(body.question))
        entry = await call(engine.kb.get, entry_id)
        return {"entry": entry.to_dict(), "created": bool(report.added_ids)}

    @kb_routes.get("/held", response_model=HeldList, responses=AUTH_ERRORS)
    async def held_entries() -> dict[str, Any]:
        """Entries held for review (they address an assistant or ask customers for secrets), with why."""
        held = await call(engine.kb.held)
        entries = await call(engine.kb.store.get_many, list(held))
        return {"held": [{**e.to_dict(), "reason": held[e.id]} for e in entries]}

    @kb_routes.post("/entries/{entry_id:path}/approve", response_model=Approved, responses=AUTH_ERRORS)
    async def approve_entry(entry_id: str) -> dict[str, Any]:
        """Serve a held entry from now on (after reading it)."""
        approved = await call(engine.kb.approve, [entry_id])
        if not approved:
            raise NotFoundError(f"no held entry with id {entry_id!r}", fix="GET /api/kb/held lists them")
        return {"approved": approved}

    @kb_routes.get("/entries/{entry_id:path}", response_model=Entry, responses=AUTH_ERRORS)
    async def get_entry(entry_id: str) -> dict[str, Any]:
        return (await call(engine.kb.get, entry_id)).to_dict()

    @kb_routes.put("/entries/{entry_id:path}", response_model=Entry, responses=AUTH_ERRORS)
    async def update_entry(entry_id: str, body: EntryPatch) -> dict[str, Any]:
        """Change some fields of an entry (the others stay); re-indexed at once."""
        changes = body.model_dump(exclude_unset=True)
        if not changes:
            raise ApiError(422, "ValidationError", "nothing to change", "send at least one field of the entry")
        return (await call(engine.kb.update, entry_id, **changes)).to_dict()

    @kb_routes.delete("/entries/{entry_id:path}", response_model=Removed, responses=AUTH_ERRORS)
    async def delete_entry(entry_id: str) -> dict[str, Any]:
        removed = await call(engine.kb.delete, [entry_id])
        if not removed:
            raise NotFoundError(f"no entry with id {entry_id!r}", fix="GET /api/kb/entries lists the ids")
        return {"removed": removed}

    @kb_routes.post(
        "/upload",
        response_model=UploadReport,
        responses={
            **AUTH_ERRORS,
            413: {"model": ErrorBody},
            422: {"description": "the file was rejected, nothing stored; `problems` lists each bad row"},
        },
        max_body_size=upload_limit + MULTIPART_OVERHEAD,
    )
    async def upload(
        file: Annotated[UploadFile, File(description="csv, tsv, xlsx, json, jsonl or md")],
        skip_bad_rows: Annotated[bool, Form(description="store the good rows and report the bad ones")] = False,
    ) -> dict[str, Any]:
        """Validate and upsert an FAQ file, all or nothing: a problem anywhere rejects the whole file
        with HTTP 422 and every problem row by row (unless ``skip_bad_rows``)."""
        chunks, size = [], 0
        while chunk := await file.read(1024 * 1024):
            size += len(chunk)
            if size > upload_limit:
                raise ApiError(
                    413,
                    "TooLarge",
                    f"the file is over the {settings.kb.max_upload_mb:g} MB upload limit",
                    "split it into smaller files, or raise kb.max_upload_mb",
                )
            chunks.append(chunk)
        report = await call(
            engine.kb.add_bytes, b"".join(chunks), file.filename or "upload", skip_bad_rows=skip_bad_rows
        )
        return {**report.to_dict(), "added_ids": report.added_ids, "updated_ids": report.updated_ids}

    @kb_routes.post("/examples", response_model=Example, status_code=201, responses=AUTH_ERRORS)
    async def add_example(body: ExampleBody) -> dict[str, Any]:
        """Label a customer question with the entry that answers it: stored as an example, and a
        positive one is a learned phrasing of the entry at once (searchable when this returns)."""
        example = await call(
            learning.learn,
            engine.kb,
            engine.store,
            body.query,
            body.faq_id,
            source="api",
            positive=body.positive,
            conversation_id=body.conversation_id,
            message_id=body.message_id,
        )
        return example.to_dict()

    @kb_routes.get("/examples", response_model=ExampleList, responses=AUTH_ERRORS)
    async def list_examples(
        faq_id: Annotated[str | None, Query(description="examples of this entry")] = None,
        source: Annotated[str | None, Query(description="clarify, thumbs_up, thumbs_down, phrasing, ...")] = None,
        q: Annotated[str | None, Query(description="substring of the query")] = None,
        positive: bool | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> dict[str, Any]:
        """Labelled examples, newest first."""
        found = await call(engine.kb.examples, entry_id=faq_id, source=source, text=q, positive=positive, limit=limit)
        return {"examples": [e.to_dict() for e in found], "total": len(found)}

    @kb_routes.delete("/examples/{example_id}", response_model=ExamplesRemoved, responses=AUTH_ERRORS)
    async def delete_example(example_id: int) -> dict[str, Any]:
        """Undo a wrong label: the example and the learned phrasing it made are gone at once."""
        removed = await call(engine.kb.forget, [example_id])
        if not removed:
            raise NotFoundError(f"no example with id {example_id}", fix="GET /api/kb/examples lists the ids")
        return {"removed": removed}

    @kb_routes.get("/search", response_model=SearchResponse, responses=AUTH_ERRORS)
    async def search(
        q: Annotated[str, Query(min_length=1, max_length=MAX_MESSAGE_CHARS)],
        k: Annotated[int, Query(ge=1, le=50)] = 5,
        category: str | None = None,
    ) -> dict[str, Any]:
        """What a question would match, with scores (the retrieval test)."""
        hits = await call(engine.kb.search, q, k, category=category)
        results = []
        for hit in hits:
            data = hit.to_dict()
            results.append({key: data.get(key) for key in SearchResult.model_fields})
        return {"query": q, "results": results}

    # -- conversations ----------------------------------------------------------------------------
    conv_routes = APIRouter(prefix="/api/conversations", tags=["conversations"], dependencies=[Depends(staff)])

    @conv_routes.get(
        "/export.csv",
        response_class=Response,
        responses={**AUTH_ERRORS, 200: {"content": {"text/csv": {}}}},
    )
    async def export_conversations() -> Response:
        """Every message with its mode, sources, scores, latency, feedback and correction, as CSV."""
        buffer = io.StringIO()
        await call(engine.store.export_csv, buffer)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Response(
            buffer.getvalue().encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="conversations-{stamp}.csv"'},
        )

    @conv_routes.get(
        "/examples.csv",
        response_class=Response,
        responses={**AUTH_ERRORS, 200: {"content": {"text/csv": {}}}},
    )
    async def export_examples() -> Response:
        """The labelled examples (resolved questions), joined to the conversation export by
        ``conversation_id`` and ``message_id``, as CSV."""
        buffer = io.StringIO()
        await call(learning.export_examples_csv, engine.kb, buffer)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Response(
            buffer.getvalue().encode("utf-8"),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="examples-{stamp}.csv"'},
        )

    # -- OpenAI-compatible ------------------------------------------------------------------------
    v1 = APIRouter(
        prefix="/v1", tags=["OpenAI-compatible"], dependencies=[Depends(v1_key)], max_body_size=MAX_JSON_BODY
    )

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        """One model, ``supportbot``: the whole pipeline (any ``model`` value is accepted and echoed)."""
        return {
            "object": "list",
            "data": [{"id": DEFAULT_MODEL_ID, "object": "model", "created": 0, "owned_by": "supportbot"}],
        }

    @v1.post(
        "/chat/completions",
        dependencies=[Depends(rate_limited)],
        responses={**ERRORS, 200: {"content": {"text/event-stream": {}}}, 429: {"model": ErrorBody}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """The last user message is the question; the earlier ones are its context (the conversation
        they belong to is found by their hash, or by the ``conversation_id`` extension). The reply
        carries a ``supportbot`` field: mode, sources, scores, conversation and message ids."""
        turns = [(m.role, m.text()) for m in body.messages if m.role in ("user", "assistant")]
        last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=None)
        if last_user is None:
            raise ApiError(422, "ValidationError", "no user message", "send at least one message with role 'user'")
        question = turns[last_user][1]
        try:
            _check_message(question)
        except ValueError as exc:
            raise ApiError(422, "ValidationError", str(exc), "send the customer's question") from None
        earlier = turns[:last_user]
        scope = f"{client_address(request, proxies)}|{body.user or ''}"
        if body.conversation_id is not None:
            conversation_id: str | None = body.conversation_id
            owner = _conversation_owner(body.conversation_id, body.conversation_token)
            await call(engine.check_owner, body.conversation_id, owner)
        else:
            conversation_id, owner = conversations.take(scope, earlier) or (None, new_client_token())
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        created = int(time.time())

        def extension(answer: Answer) -> dict[str, Any]:
            data = _chat_json(answer, owner)
            keys = ("mode", "sources", "conversation_id", "conversation_token", "message_id", "citations")
            return {k: data[k] for k in keys}

        def usage(text: str) -> dict[str, int]:
            prompt = sum(_approx_tokens(t) for _, t in turns[: last_user + 1])
            completion = _approx_tokens(text)
            return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

        if not body.stream:
            answer = await call(engine.answer, question, conversation_id, client="openai", owner=owner)
            conversations.remember(
                scope, [*earlier, ("user", question), ("assistant", answer.text)], answer.conversation_id, owner
            )
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer.text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage(answer.text),
                "supportbot": extension(answer),
            }

        events = engine.answer_stream(question, conversation_id, client="openai", owner=owner)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }
            return _sse(payload)

        async def stream() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            sent = ""
            try:
                async for event in iterate(events):
                    if event.kind == "delta" and event.text:
                        sent += event.text
                        yield chunk({"content": event.text})
                    elif event.kind == "done" and event.answer is not None:
                        answer = event.answer
                        replaced = not answer.text.startswith(sent)
                        # A stream cannot take text back: when the grounding check replaced the
                        # generated text, the final answer follows it, flagged in `supportbot`.
                        rest = ("\n\n" + answer.text) if replaced else answer.text[len(sent) :]
                        if rest:
                            sent += rest
                            yield chunk({"content": rest})
                        conversations.remember(
                            scope, [*earlier, ("user", question), ("assistant", sent)], answer.conversation_id, owner
                        )
                        yield chunk(
                            {},
                            "stop",
                            usage=usage(sent),
                            supportbot={**extension(answer), "replaced": replaced, "answer": answer.text},
                        )
            except SupportBotError as exc:
                yield _sse({"error": {"message": exc.message, "type": type(exc).__name__, "fix": exc.fix}})
            except Exception:
                log.exception("chat completion stream failed")
                yield _sse({"error": {"message": "the answer failed; see the server log", "type": "InternalError"}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)

    add_handoff_routes(public, engine, call)  # contact and the team's replies (ui/api_handoff.py)
    for router in (public, kb_routes, conv_routes, v1):
        app.include_router(router)
