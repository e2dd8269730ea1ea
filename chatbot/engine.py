"""The chat engine: one customer message in, one answer out (or a stream of it).

Flow: follow-up resolution -> retrieve -> policy -> answer -> store. The engine imports no web
framework; the CLI, the Gradio pages and the HTTP API all call :meth:`ChatEngine.answer` or
:meth:`ChatEngine.answer_stream`.

Concurrency: one engine (and one model) serves every thread. ``faq``, ``clarify`` and ``handoff``
answers never touch the generator, so they never wait behind a generation; generations take one
of ``server.generation_concurrency`` slots and queue for the rest (a batching generator, see
``chatbot.batching``, has those slots as batch rows and queues in FIFO order itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from chatbot import learning
from chatbot.followup import resolve_followup
from chatbot.generation import Generator
from chatbot.generation_policy import GenerationSwitch
from chatbot.grounding import grounding_score, is_refusal, leaks
from chatbot.guarded_stream import GuardCheck, SentenceGuard
from chatbot.handoff import Handoff
from chatbot.policy import THRESHOLD_FIELDS, Decision, decide
from chatbot.prompts import build_messages, load_prompt
from chatbot.settings import SECRET_FIELDS, PolicySettings, Settings
from chatbot.store import ConversationStore
from knowledge_base.entry import normalize_text
from knowledge_base.errors import NotFoundError, SupportBotError
from knowledge_base.kb import KnowledgeBase
from knowledge_base.retriever import SearchHit

__all__ = ["MAX_MESSAGE_CHARS", "Answer", "ChatEngine", "StreamEvent"]

_NOT_FAILED = object()

MAX_MESSAGE_CHARS = 4000
#: Fields of an answer kept from public clients (see :meth:`Answer.public_dict`).
PRIVATE_FIELDS = ("scores", "reason")
#: The one error for an unknown conversation and for somebody else's: it reveals nothing about either.
NOT_YOURS = "no conversation with this id belongs to this client"
NOT_YOUR_ANSWER = "no answer with this id in this client's conversations"
FIX_NOT_YOURS = "send the conversation_token returned with the conversation, or leave conversation_id out to start one"
log = logging.getLogger(__name__)


@dataclass
class Answer:
    text: str
    mode: str
    sources: list[str]
    scores: list[float]
    latency_ms: float
    conversation_id: str
    message_id: int
    options: list[dict[str, str]] = field(default_factory=list)
    citations: list[dict[str, Any]] = field(default_factory=list)
    question: str = ""
    model: str | None = None
    adapter: str | None = None
    reason: str = ""
    ticket_id: int | None = None
    """The hand-off ticket (`chatbot.handoff`) a ``handoff`` answer opened or joined."""

    def to_dict(self) -> dict[str, Any]:
        """The CLI ``chat`` JSON (DESIGN.md) plus ids, options and citations."""
        out = asdict(self)
        out["latency_ms"] = round(self.latency_ms, 1)
        out["scores"] = [round(s, 4) for s in self.scores]
        return out

    def public_dict(self) -> dict[str, Any]:
        """What a customer's client may see: :meth:`to_dict` without the policy's internals
        (``scores``, ``reason``, each citation's ``score``), which would let anyone probe the
        thresholds. The operator's tools (CLI, console, store) keep them."""
        out = self.to_dict()
        for key in PRIVATE_FIELDS:
            out.pop(key, None)
        out["citations"] = [{k: v for k, v in c.items() if k != "score"} for c in out["citations"]]
        return out


@dataclass
class StreamEvent:
    kind: str  # "delta": a chunk of text; "done": the final answer (its text is authoritative)
    text: str = ""
    answer: Answer | None = None


def _citation(hit: SearchHit) -> dict[str, Any]:
    return {
        "id": hit.entry.id,
        "question": hit.entry.question,
        "answer": hit.entry.answer,
        "score": round(hit.score, 4),
    }


class ChatEngine:
    def __init__(
        self,
        settings: Settings,
        kb: KnowledgeBase,
        store: ConversationStore,
        *,
        generator: Generator | None = None,
        generator_factory: Callable[[], Generator] | None = None,
    ) -> None:
        self.settings = settings
        self.kb = kb
        self.store = store
        self._generator = generator
        self._generator_factory = generator_factory
        self._generator_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.server.generation_concurrency)
        self._adapter_version: str | None = None
        # What a rollback to "no retriever version" serves: the embedder the engine was given.
        self._base_embedder = kb.embedder if kb.retriever_version is None else None
        self._retriever_failed: object = _NOT_FAILED  # a version that failed to load is not retried per question
        self._system_prompt = load_prompt("system")
        self.generation = GenerationSwitch()
        self.handoff = Handoff(settings, store)
        self._secrets = [
            str(getattr(getattr(settings, section), name))
            for section in ("model", "server", "handoff")
            for name in SECRET_FIELDS
            if getattr(getattr(settings, section), name, "")
        ]

    # -- the generator, loaded on first use --------------------------------------------------------
    @property
    def generator(self) -> Generator:
        with self._generator_lock:
            if self._generator is None:
                if self._generator_factory is None:
                    raise SupportBotError("no generator configured", fix="pass generator= or generator_factory=")
                self._generator = self._generator_factory()
            self._sync_adapter(self._generator)
            return self._generator

    def _sync_adapter(self, generator: Generator) -> None:
        """Pick up the adapter activated in the console or CLI, without a restart."""
        if self.settings.model.backend != "local":
            return
        from chatbot.adapters import AdapterRegistry

        active = AdapterRegistry(self.settings.data_dir).active()
        version = active.version if active else None
        if version != self._adapter_version:
            generator.set_adapter(active.path if active else None, version)
            self._adapter_version = version

    # -- answering ---------------------------------------------------------------------------------
    def answer(
        self, message: str, conversation_id: str | None = None, *, client: str = "", owner: str | None = None
    ) -> Answer:
        final = None
        for event in self.answer_stream(message, conversation_id, client=client, owner=owner):
            if event.kind == "done":
                final = event.answer
        assert final is not None
        return final

    # -- the retriever version and the thresholds that go with it ---------------------------------
    def sync_retriever(self) -> None:
        """Pick up a retriever version activated or rolled back in the console or CLI, without a
        restart: the knowledge base re-embeds in the background and swaps when ready (searches are
        served by the old version meanwhile). Costs one small JSON read per question."""
        from knowledge_base.retrievers import RetrieverRegistry, serve_version

        if self.kb.swapping:
            return
        active = RetrieverRegistry(self.settings.data_dir).active()
        wanted = active.version if active else None
        if wanted != self.kb.retriever_version and wanted != self._retriever_failed:
            try:
                serve_version(self.kb, active, self.settings.kb, base=self._base_embedder)
            except SupportBotError:
                self._retriever_failed = wanted
                raise

    @property
    def policy(self) -> PolicySettings:
        """The policy settings in force: the thresholds calibrated for the active retriever version
        (unless ``policy.pin_thresholds`` keeps the configured ones), and ``generate`` resolved from
        ``policy.generation`` (auto/on/off)."""
        policy = self.settings.policy
        thresholds = self.kb.retriever_thresholds
        if thresholds and not policy.pin_thresholds:
            changes = {k: float(thresholds[k]) for k in THRESHOLD_FIELDS if k in thresholds}
            policy = dataclasses.replace(policy, **changes)  # type: ignore[arg-type]
        on = self.generation.verdict(self.settings).on
        return policy if policy.generate == on else dataclasses.replace(policy, generate=on)

    @property
    def _retrieval_k(self) -> int:
        return max(self.settings.kb.top_k, self.settings.policy.max_clarify_options)

    def retrieve(self, question: str) -> list[SearchHit]:
        self.sync_retriever()
        return self.kb.search(question, self._retrieval_k)

    def decide(self, question: str) -> tuple[list[SearchHit], Decision]:
        hits = self.retrieve(question)
        return hits, decide(question, hits, self.policy)

    def _previous_questions(self, conversation_id: str) -> list[str]:
        history = self.store.history(conversation_id, limit=2 * self.settings.policy.history_turns)
        return [m.question or "" for m in history if m.role == "assistant" and m.question]

    def answer_stream(
        self, message: str, conversation_id: str | None = None, *, client: str = "", owner: str | None = None
    ) -> Iterator[StreamEvent]:
        """Answer ``message``, continuing ``conversation_id`` (a new conversation when it is None).

        ``owner``: the secret token of the public client asking (a chat page's browser, an API
        client). A new conversation is bound to it, and an existing one is continued only with the
        token it was started with; an unknown id and somebody else's get the same
        :class:`NotFoundError`. Without ``owner`` (the operator's CLI) any id is continued and an
        unknown one starts a new conversation."""
        start = time.perf_counter()
        message = normalize_text(message or "")
        if not message:
            raise SupportBotError("the message is empty", fix="type a question")
        if len(message) > MAX_MESSAGE_CHARS:
            raise SupportBotError(
                f"the message has {len(message)} characters, more than {MAX_MESSAGE_CHARS}",
                fix="shorten it to the question itself",
            )
        if owner is not None and conversation_id is not None:
            self.check_owner(conversation_id, owner)
        if conversation_id is None or (owner is None and not self.store.conversation_exists(conversation_id)):
            conversation_id = self.store.create_conversation(client=client, owner=owner)
        else:  # a clicked clarify option teaches the retriever what the customer's question meant
            self._learn_clarify_choice(conversation_id, message)
        previous = self._previous_questions(conversation_id)
        self.store.add_message(conversation_id, "user", message)

        self.sync_retriever()
        policy = self.policy  # one version's thresholds for the whole answer
        question, hits = resolve_followup(message, previous, self.kb.search, self._retrieval_k)
        decision = decide(question, hits, policy)
        if not len(self.kb):
            decision = Decision("handoff", [], "the knowledge base is empty")

        text, mode, used = "", decision.mode, decision.hits
        model = adapter = None
        if mode == "generated":
            # Only text the guard accepted reaches the customer (chatbot.guarded_stream).
            guard = SentenceGuard(self._guard_check(question, used))
            draft = self._generate(question, used, conversation_id)
            try:
                for chunk in draft:
                    shown = guard.feed(chunk)
                    if shown:
                        yield StreamEvent("delta", shown)
                    if guard.stopped:
                        break
                shown = guard.finish()
                if shown:
                    yield StreamEvent("delta", shown)
            except SupportBotError as exc:
                decision = Decision(decision.mode, used, f"generation failed: {exc.message}")
            finally:
                close = getattr(draft, "close", None)
                if close is not None:
                    close()  # a stopped draft stops its generation thread
            model, adapter = self._generator.name if self._generator else None, self._adapter_version
            if guard.released.strip():
                text = guard.released.strip()
                grounded = grounding_score(text, [f"{h.entry.question} {h.entry.answer}" for h in used], question)
                reason = f"{decision.reason}; grounding {grounded:.2f}"
                if guard.withheld.strip() or guard.stopped:
                    reason += f"; the guard withheld the rest of the draft ({guard.last_reason})"
                decision = Decision("generated", used, reason)
            else:
                text, mode, used, reason = self._check_generated(
                    (guard.released + guard.withheld).strip(), question, used, hits, decision, policy
                )
                if guard.stopped:
                    text, mode, used, reason = self._fallback(hits, f"leaks the {guard.last_reason}", leaked=True)
                decision = Decision(mode, used, reason)
            mode = decision.mode
        if mode == "faq":
            text = used[0].entry.answer
        elif mode == "clarify":
            text = "Did you mean one of these?\n" + "\n".join(f"- {h.entry.question}" for h in used)
        elif mode == "handoff":
            text = self.handoff.message()
        latency = (time.perf_counter() - start) * 1000
        message_id = self.store.add_message(
            conversation_id,
            "assistant",
            text,
            mode=mode,
            sources=[h.entry.id for h in used],
            scores=[h.score for h in used],
            latency_ms=latency,
            model=model,
            adapter=adapter,
            question=question,
        )
        if mode == "handoff":
            self.store.add_unanswered(
                question,
                conversation_id=conversation_id,
                message_id=message_id,
                top_score=hits[0].score if hits else None,
                reason="handoff",
            )
            ticket_id: int | None = self.handoff.open_ticket(conversation_id, message_id, question).id
        else:
            ticket_id = None
        if mode in ("faq", "generated"):
            self.kb.record_hits([used[0].entry.id])
        answer = Answer(
            text=text,
            mode=mode,
            sources=[h.entry.id for h in used],
            scores=[round(h.score, 4) for h in used],
            latency_ms=latency,
            conversation_id=conversation_id,
            message_id=message_id,
            options=[{"id": h.entry.id, "question": h.entry.question} for h in used] if mode == "clarify" else [],
            citations=[_citation(h) for h in used] if mode in ("faq", "generated") else [],
            question=question,
            model=model,
            adapter=adapter,
            reason=decision.reason,
            ticket_id=ticket_id,
        )
        if mode != "generated":
            yield StreamEvent("delta", text)
        yield StreamEvent("done", answer.text, answer)

    def _learn_clarify_choice(self, conversation_id: str, message: str) -> None:
        try:
            learning.record_clarify_choice(self.kb, self.store, conversation_id, message)
        except SupportBotError as exc:  # learning must never cost the customer the answer
            log.warning("clarify choice not learned: %s", exc.message)

    def _generate(self, question: str, hits: list[SearchHit], conversation_id: str) -> Iterator[str]:
        history = self.store.history(conversation_id, limit=2 * self.settings.policy.history_turns + 1)[:-1]
        turns = [(m.role, m.text) for m in history if m.mode in (None, "faq", "generated")]
        messages = build_messages(question, [h.entry for h in hits], turns, system=self._system_prompt)
        generator = self.generator
        # A batching generator queues (FIFO) and batches itself; the others take one of our slots.
        with contextlib.nullcontext() if generator.batches else self._slots:
            yield from generator.stream(messages)

    def _check_generated(
        self,
        text: str,
        question: str,
        used: list[SearchHit],
        hits: list[SearchHit],
        decision: Decision,
        policy: PolicySettings,
    ) -> tuple[str, str, list[SearchHit], str]:
        """Keep a generated answer only if it is grounded and leaks nothing; else fall back."""
        leaked = leaks(text, system_prompt=self._system_prompt, secrets=self._secrets)
        grounded = grounding_score(text, [f"{h.entry.question} {h.entry.answer}" for h in used], question)
        if text and not leaked and not is_refusal(text) and grounded >= policy.grounding_threshold:
            return text, "generated", used, f"{decision.reason}; grounding {grounded:.2f}"
        why = f"leaks the {leaked}" if leaked else "refused" if is_refusal(text) else f"grounding {grounded:.2f}"
        return self._fallback(hits, why, leaked=bool(leaked))

    def _guard_check(self, question: str, used: list[SearchHit]) -> Callable[[str], GuardCheck]:
        """The whole-answer checks of `_check_generated`, applied to each prefix the guard may show."""
        sources = [f"{h.entry.question} {h.entry.answer}" for h in used]
        threshold = self.settings.policy.grounding_threshold

        def check(text: str) -> GuardCheck:
            leaked = leaks(text, system_prompt=self._system_prompt, secrets=self._secrets)
            if leaked:
                return GuardCheck(False, leaked, stop=True)
            if is_refusal(text):
                return GuardCheck(False, "refused")
            grounded = grounding_score(text, sources, question)
            if grounded < threshold:
                return GuardCheck(False, f"grounding {grounded:.2f}")
            return GuardCheck(True)

        return check

    def _fallback(
        self, hits: list[SearchHit], why: str, *, leaked: bool = False
    ) -> tuple[str, str, list[SearchHit], str]:
        """The best entry when it is close enough to the FAQ threshold, else a hand-off."""
        policy = self.policy  # the active retriever version's thresholds
        top = hits[0] if hits else None
        middle = (policy.relevance_threshold + policy.faq_threshold) / 2
        if top is not None and top.score >= middle and not leaked:
            return top.entry.answer, "faq", [top], f"generated answer rejected ({why}): best entry instead"
        return "", "handoff", [], f"generated answer rejected ({why})"

    def check_owner(self, conversation_id: str, owner: str) -> None:
        """Raise the uniform :class:`NotFoundError` unless ``owner`` started ``conversation_id``."""
        if not self.store.owns(owner, conversation_id):
            raise NotFoundError(NOT_YOURS, fix=FIX_NOT_YOURS)

    # -- the rest of the customer's loop ----------------------------------------------------------
    def feedback(self, message_id: int, rating: str, comment: str = "", *, owner: str | None = None) -> None:
        """Rate an answer. With ``owner`` (a public client) only answers in its own conversations,
        and any other id gets the same :class:`NotFoundError`."""
        if rating not in ("up", "down"):
            raise SupportBotError(f"rating {rating!r} is not 'up' or 'down'", fix="send 'up' or 'down'")
        if owner is not None and not self.store.owns_answer(owner, message_id):
            raise NotFoundError(
                NOT_YOUR_ANSWER, fix="rate the message_id of an answer, with its conversation's conversation_token"
            )
        self.store.add_feedback(message_id, rating, comment)
        learning.safe_record_rating(self.kb, self.store, message_id, rating)
        if rating == "down":
            message = self.store.get_message(message_id)
            self.store.add_unanswered(
                message.question or message.text,
                conversation_id=message.conversation_id,
                message_id=message_id,
                top_score=message.scores[0] if message.scores else None,
                reason="thumbs_down",
            )

    def suggested_questions(self, n: int = 4) -> list[str]:
        """The most asked entries' questions (the first entries while nothing has been asked)."""
        entries = self.kb.entries(enabled_only=True)
        entries.sort(key=lambda e: (-e.hits, e.id))
        return [e.question for e in entries[:n]]

    def draft_answer(self, question: str) -> str:
        """An answer for a new entry, drafted from related entries for an operator to edit."""
        hits = [h for h in self.retrieve(question) if h.score >= self.policy.relevance_threshold]
        if not hits:
            return ""
        try:
            generator = self.generator
            with contextlib.nullcontext() if generator.batches else self._slots:
                draft = generator.generate(build_messages(question, [h.entry for h in hits[:3]]))
        except SupportBotError:
            draft = ""
        return draft.strip() if draft.strip() and not is_refusal(draft) else hits[0].entry.answer
