"""Supervised fine-tuning data: question–answer pairs in, tokenized chat examples out.

The pipeline, each step a plain function so the CLI, the web console and the tests share it:

1. **Pairs** (:class:`QAPair`) from three kinds of source:
   :func:`pairs_from_entries` (every phrasing of every FAQ entry → its answer),
   :func:`pairs_from_conversations` (thumbs-up answers and operator corrections from the store), and
   :func:`load_pairs` (external JSONL/JSON/CSV/TSV files: ``question``/``answer`` records, OpenAI-style
   ``messages`` lists, alpaca ``instruction``/``input``/``output`` and sharegpt ``conversations``).
   Each pair carries a *group*, the FAQ entry it belongs to (for files without an entry id: a hash
   of the answer, so the phrasings of one answer stay together).
2. :func:`dedupe` and :func:`split_by_group`: the eval split takes whole groups, so no phrasing of an
   eval entry is trained on (not even as retrieved context in a training prompt).
3. :func:`build_examples` renders :class:`SFTExample` in one or both layouts:

   - ``rag``: the FAQ entries a retriever returns for the question, laid out by
     :func:`chatbot.prompts.build_messages`, the very function the chat engine serves with, so the
     model trains on the text it will see. The gold entry is always among them (put at a random
     position when retrieval missed it). A fraction of extra examples shows entries that do *not*
     answer the question with the target ``I don't know.``, the refusal the system prompt asks for.
   - ``closed``: the question alone (:func:`chatbot.prompts.build_closed_book_messages`).
4. :func:`tokenize_examples`: prompt ids from the model's chat template, then the answer ids and the
   end-of-turn token. Labels cover the answer and that token only; they are masked by *position*
   (``prompt_len``), not by pad id, because pad = eos in SmolLM2 and the model must learn to stop.
   An example longer than ``max_length`` first loses its lowest-ranked context entries (never the
   gold one) and earlier turns; if it still does not fit, :func:`fit_examples` (what training uses)
   grows the budget to the longest example up to the model's context and skips, listing them in the
   report, the few longer than that; :func:`tokenize_examples` (strict) names them in an error.

Every problem with the data is collected and raised once as a :class:`DataError` naming the file and
line (``faq.jsonl:12: missing field 'answer'``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from chatbot.prompts import build_closed_book_messages, build_messages
from knowledge_base.entry import FAQEntry, normalize_text, text_hash
from knowledge_base.errors import Problem, ProblemsError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "REFUSAL",
    "DataError",
    "FittedExamples",
    "PreparedData",
    "QAPair",
    "Retrieve",
    "SFTExample",
    "TokenizedExample",
    "build_examples",
    "dataset_hash",
    "dedupe",
    "end_of_turn_ids",
    "fit_examples",
    "lexical_retriever",
    "load_pairs",
    "pairs_from_conversations",
    "pairs_from_entries",
    "prepare_data",
    "split_by_group",
    "tokenize_examples",
]

#: The refusal the system prompt asks for when the entries do not answer the question.
REFUSAL = "I don't know."
Layout = Literal["rag", "closed"]
Retrieve = Callable[[str], Sequence[FAQEntry]]
History = tuple[tuple[str, str], ...]

SUPPORTED_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")
FORMATS_FIX = (
    "give each record question+answer, an OpenAI-style 'messages' list, alpaca instruction/output "
    "(optional input, history) or sharegpt 'conversations' (from/value); see docs/finetuning.md"
)


class DataError(ProblemsError):
    """Training or evaluation data that cannot be used; lists every problem found."""

    title = "the fine-tuning data was rejected"


# --------------------------------------------------------------------------------------------------
# Pairs


@dataclass(frozen=True)
class QAPair:
    """One question and the answer to learn, before any prompt layout."""

    question: str
    answer: str
    group: str
    """Split key: the FAQ entry id (or, for files without one, ``answer:<hash>``)."""
    source: str
    """Where it came from, for messages: ``kb:orders-001``, ``conversation:42``, ``train.jsonl:7``."""
    gold: tuple[FAQEntry, ...] = ()
    """Entries that answer it; the rag layout always shows the first. Empty: made from the pair."""
    history: History = ()
    """Earlier (role, text) turns of a multi-turn record, oldest first."""

    def gold_entries(self) -> tuple[FAQEntry, ...]:
        """The gold entries, or an entry made of the pair itself when it has none (external files)."""
        if self.gold:
            return self.gold
        return (FAQEntry(id=self.group, question=self.question, answer=self.answer),)


def _norm_key(text: str) -> str:
    return re.sub(r"\s+", " ", normalize_text(text)).casefold()


def _answer_group(answer: str) -> str:
    return "answer:" + text_hash(_norm_key(answer))[:12]


def pairs_from_entries(entries: Iterable[FAQEntry]) -> list[QAPair]:
    """One pair per phrasing of each enabled entry (main question first)."""
    out = []
    for entry in entries:
        if not entry.enabled:
            continue
        for i, question in enumerate(entry.questions):
            if question.strip() and entry.answer.strip():
                source = f"kb:{entry.id}" if i == 0 else f"kb:{entry.id}#alt{i}"
                out.append(QAPair(question, entry.answer, entry.id, source, gold=(entry,)))
    return out


def pairs_from_conversations(pairs: Iterable[Any], entries: Sequence[FAQEntry] = ()) -> list[QAPair]:
    """Pairs from ``ConversationStore.training_pairs()`` (thumbs-up answers, operator corrections).

    A pair's ``sources`` (entry ids) become its gold entries and its group, so a conversation about
    entry X lands in the same split as X itself. Sources no longer in the knowledge base are dropped.
    """
    by_id = {e.id: e for e in entries}
    out = []
    for pair in pairs:
        question = normalize_text(str(getattr(pair, "question", "") or ""))
        answer = normalize_text(str(getattr(pair, "answer", "") or ""))
        if not question or not answer:
            continue
        sources = [str(s) for s in (getattr(pair, "sources", None) or ())]
        gold = tuple(by_id[s] for s in sources if s in by_id)
        group = gold[0].id if gold else (sources[0] if sources else _answer_group(answer))
        origin = getattr(pair, "origin", "conversation")
        ref = f"conversation:{getattr(pair, 'message_id', '?')}({origin})"
        out.append(QAPair(question, answer, group, ref, gold=gold))
    return out


def _text(value: Any) -> str:
    return normalize_text(value) if isinstance(value, str) else ""


def _split_alts(value: Any) -> list[str]:
    if isinstance(value, list):
        return [_text(v) for v in value if _text(v)]
    if isinstance(value, str):
        return [_text(v) for v in value.split(" | ") if _text(v)]
    return []


_ROLE = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant"}
_ROLE.update(bot="assistant", system="system")


def _pair_from_turns(
    turns: list[tuple[str, str]], where: str, group_hint: str, problems: list[Problem]
) -> QAPair | None:
    """The last assistant turn is the target, the user turn before it the question, the rest history.

    A system turn is dropped: training uses the engine's own system prompt, the one it serves with.
    """
    turns = [(role, text) for role, text in turns if role != "system"]
    last = max((i for i, (role, _) in enumerate(turns) if role == "assistant"), default=-1)
    if last < 0:
        problems.append(Problem(where, "no assistant message to learn from", "end the record with the answer"))
        return None
    if last == 0 or turns[last - 1][0] != "user":
        problems.append(Problem(where, "the last answer does not follow a user message", FORMATS_FIX))
        return None
    question, answer = turns[last - 1][1], turns[last][1]
    if not question or not answer:
        problems.append(Problem(where, "empty question or answer", "fill in both texts or drop the record"))
        return None
    group = group_hint or _answer_group(answer)
    return QAPair(question, answer, group, where, history=tuple(turns[: last - 1]))


def _pairs_from_record(record: Any, where: str, problems: list[Problem]) -> list[QAPair]:
    """Detect the record's layout and turn it into pairs (several for FAQ rows with alt questions)."""
    if not isinstance(record, dict):
        problems.append(Problem(where, f"expected an object, found {type(record).__name__}", FORMATS_FIX))
        return []
    group_hint = _text(record.get("faq_id")) or _text(str(record["id"]) if record.get("id") is not None else "")

    if "messages" in record or "conversations" in record:
        key = "messages" if "messages" in record else "conversations"
        role_key, text_key = ("role", "content") if key == "messages" else ("from", "value")
        raw = record[key]
        if not isinstance(raw, list) or not raw:
            problems.append(Problem(where, f"{key!r} must be a non-empty list", FORMATS_FIX))
            return []
        turns = []
        for i, turn in enumerate(raw, 1):
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                problems.append(Problem(where, f"{key}[{i}] needs {role_key!r} and {text_key!r}", FORMATS_FIX))
                return []
            role = _ROLE.get(str(turn[role_key]).lower())
            if role is None:
                problems.append(
                    Problem(where, f"{key}[{i}] has unsupported role {turn[role_key]!r}", "use user/assistant/system")
                )
                return []
            turns.append((role, _text(turn[text_key])))
        pair = _pair_from_turns(turns, where, group_hint, problems)
        return [pair] if pair else []

    if "instruction" in record:  # alpaca
        instruction, extra, output = _text(record.get("instruction")), _text(record.get("input")), record.get("output")
        if output is None:
            problems.append(Problem(where, "missing field 'output' (alpaca layout)", FORMATS_FIX))
            return []
        turns = []
        for item in record.get("history") or []:
            if isinstance(item, list | tuple) and len(item) == 2:
                turns += [("user", _text(item[0])), ("assistant", _text(item[1]))]
        question = f"{instruction}\n{extra}" if extra else instruction
        pair = _pair_from_turns([*turns, ("user", question), ("assistant", _text(output))], where, group_hint, problems)
        return [pair] if pair else []

    missing = [key for key in ("question", "answer") if key not in record]
    if missing:
        found = ", ".join(map(repr, list(record)[:8])) or "none"
        what = " and ".join(repr(m) for m in missing)
        problems.append(Problem(where, f"missing field {what} (fields found: {found})", FORMATS_FIX))
        return []
    question, answer = _text(record["question"]), _text(record["answer"])
    if not question or not answer:
        empty = "question" if not question else "answer"
        problems.append(Problem(where, f"empty {empty!r}", "fill it in or drop the record"))
        return []
    group = group_hint or _answer_group(answer)
    phrasings = [question, *(q for q in _split_alts(record.get("alt_questions")) if q != question)]
    # The record is its own gold entry when it has an id: then all its phrasings share that context.
    gold = (FAQEntry(id=group, question=question, answer=answer),) if group_hint else ()
    return [
        QAPair(q, answer, group, where if i == 0 else f"{where}#alt{i}", gold=gold) for i, q in enumerate(phrasings)
    ]


def _records(path: Path, text: str, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record in the file; syntax problems go to ``problems``."""
    name = path.name
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{name}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(f"{name}:{number}", f"not valid JSON: {exc.msg}", "one JSON object per line"))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.append(Problem(f"{name}:{exc.lineno}", f"not valid JSON: {exc.msg}", "fix the syntax"))
            return
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            problems.append(Problem(name, "expected a JSON list of records", "or use JSONL, one record per line"))
            return
        for i, record in enumerate(data, 1):
            yield f"{name}[record {i}]", record
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            return
        reader.fieldnames = [f.strip().lower() for f in reader.fieldnames]
        start = reader.line_num + 1
        for row in reader:
            record = {k: v for k, v in row.items() if k and v not in (None, "")}
            yield f"{name}:{start}", record
            start = reader.line_num + 1


def load_pairs(path: Path | str) -> list[QAPair]:
    """Read an external training or evaluation file; raise DataError listing every bad record."""
    path = Path(path)
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataError(
            [Problem(str(path), f"unsupported file type {path.suffix!r}", "use .jsonl, .json, .csv or .tsv")]
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError([Problem(str(path), "file not found", "check the path")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError([Problem(str(path), f"cannot read it: {exc}", "save it as UTF-8 text")]) from None
    if not text.strip():
        raise DataError([Problem(str(path), "the file is empty", FORMATS_FIX)])
    problems: list[Problem] = []
    pairs: list[QAPair] = []
    for where, record in _records(path, text, problems):
        pairs += _pairs_from_record(record, where, problems)
    if problems:
        raise DataError(problems)
    if not pairs:
        raise DataError([Problem(str(path), "no records found", FORMATS_FIX)])
    return pairs


def dedupe(pairs: Iterable[QAPair]) -> tuple[list[QAPair], int]:
    """Drop repeated (question, answer, history) pairs, case and spacing folded; keeps the first."""
    seen: set[tuple[str, str, History]] = set()
    out = []
    dropped = 0
    for pair in pairs:
        key = (_norm_key(pair.question), _norm_key(pair.answer), pair.history)
        if key in seen:
            dropped += 1
        else:
            seen.add(key)
            out.append(pair)
    return out, dropped


def split_by_group(pairs: Sequence[QAPair], eval_fraction: float, seed: int) -> tuple[list[QAPair], list[QAPair]]:
    """(train, eval) with whole groups (FAQ entries) on one side: no eval phrasing is trained on."""
    groups = sorted({p.group for p in pairs})
    if len(groups) < 2:
        return list(pairs), []
    random.Random(seed).shuffle(groups)
    n_eval = min(max(1, round(eval_fraction * len(groups))), len(groups) - 1)
    held_out = set(groups[:n_eval])
    return [p for p in pairs if p.group not in held_out], [p for p in pairs if p.group in held_out]


# --------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class SFTExample:
    """One training example: the chat the model reads and the answer it must write."""

    question: str
    answer: str
    layout: Layout
    group: str
    source: str
    context: tuple[FAQEntry, ...] = ()
    """The FAQ entries shown with the question (rag layout), best first as the retriever ranked them."""
    gold_ids: tuple[str, ...] = ()
    """Ids of the context entries that answer the question (never dropped when shortening)."""
    history: History = ()
    refusal: bool = False
    """True when no context entry answers the question and the target is :data:`REFUSAL`."""

    def messages(
        self, context: Sequence[FAQEntry] | None = None, history: History | None = None
    ) -> list[dict[str, str]]:
        """The prompt as chat messages (ending with the user's turn), as the engine would send it."""
        context = self.context if context is None else context
        history = self.history if history is None else history
        if self.layout == "rag":
            return build_messages(self.question, context, history)
        messages = build_closed_book_messages(self.question)
        return [messages[0], *({"role": r, "content": t} for r, t in history), *messages[1:]]

    def to_dict(self) -> dict[str, Any]:
        """The example as an OpenAI-style ``messages`` record (+ where it came from)."""
        return {
            "messages": [*self.messages(), {"role": "assistant", "content": self.answer}],
            "layout": self.layout,
            "group": self.group,
            "source": self.source,
            "refusal": self.refusal,
        }


_WORD = re.compile(r"\w+")


def lexical_retriever(entries: Sequence[FAQEntry], k: int = 3) -> Retrieve:
    """A small TF-IDF retriever over every phrasing of ``entries``: for tests and when no index exists.

    The CLI uses the knowledge base's own hybrid retriever (``kb.search``) instead, as served.
    """
    docs: list[tuple[FAQEntry, Counter[str]]] = []
    df: Counter[str] = Counter()
    for entry in entries:
        for phrasing in entry.questions:
            bag = Counter(_WORD.findall(phrasing.casefold()))
            docs.append((entry, bag))
            df.update(bag.keys())
    n = max(len(docs), 1)
    idf = {w: math.log((n + 1) / (c + 0.5)) for w, c in df.items()}

    def vector(bag: Counter[str]) -> tuple[dict[str, float], float]:
        vec = {w: c * idf.get(w, math.log(n + 1)) for w, c in bag.items()}
        return vec, math.sqrt(sum(v * v for v in vec.values())) or 1.0

    vectors = [(entry, *vector(bag)) for entry, bag in docs]

    def retrieve(question: str) -> list[FAQEntry]:
        qvec, qnorm = vector(Counter(_WORD.findall(question.casefold())))
        best: dict[str, tuple[float, FAQEntry]] = {}
        for entry, vec, norm in vectors:
            score = sum(w * vec.get(t, 0.0) for t, w in qvec.items()) / (qnorm * norm)
            if entry.id not in best or score > best[entry.id][0]:
                best[entry.id] = (score, entry)
        ranked = sorted(best.values(), key=lambda item: (-item[0], item[1].id))
        return [entry for _, entry in ranked[:k]]

    return retrieve


def build_examples(
    pairs: Sequence[QAPair],
    *,
    layout: Literal["rag", "closed", "both"],
    retrieve: Retrieve | None = None,
    k: int = 3,
    refusal_fraction: float = 0.1,
    exclude_ids: Iterable[str] = (),
    seed: int = 0,
) -> list[SFTExample]:
    """Render pairs as examples in the given layout(s).

    ``retrieve(question)`` returns the entries the engine would show, best first; ``k`` of them are
    used (the engine's ``policy.max_context_entries``). Without a retriever, a lexical one over the
    pairs' own gold entries stands in. ``exclude_ids`` (the eval entries, when building training
    examples) never appear as context. ``refusal_fraction`` of the rag examples get a twin whose
    context does not answer the question and whose target is :data:`REFUSAL`; its entries come from
    another question's retrieval, so the "wrong" context surely lacks the answer.
    """
    rng = random.Random(seed)
    excluded = set(exclude_ids)
    out: list[SFTExample] = []
    want_rag = layout in ("rag", "both")
    if want_rag and retrieve is None:
        pool = {e.id: e for p in pairs for e in p.gold_entries()}
        retrieve = lexical_retriever(list(pool.values()), k)
    cache: dict[str, list[FAQEntry]] = {}

    def retrieved(question: str) -> list[FAQEntry]:
        if question not in cache:
            assert retrieve is not None
            seen: set[str] = set()
            ranked = []
            for entry in retrieve(question):
                if entry.id not in excluded and entry.id not in seen:
                    seen.add(entry.id)
                    ranked.append(entry)
            cache[question] = ranked
        return cache[question]

    rag_pairs: list[QAPair] = []
    for pair in pairs:
        if want_rag:
            gold = pair.gold_entries()
            gold_ids = {e.id for e in gold}
            context = retrieved(pair.question)[:k]
            # An entry with the very answer counts as gold (e.g. a file's record that is also in the KB).
            answer_key = _norm_key(pair.answer)
            gold_ids |= {e.id for e in context if _norm_key(e.answer) == answer_key}
            if not gold_ids & {e.id for e in context}:
                context = context[: k - 1]
                context.insert(rng.randint(0, len(context)), gold[0])
            out.append(
                SFTExample(
                    pair.question,
                    pair.answer,
                    "rag",
                    pair.group,
                    pair.source,
                    context=tuple(context),
                    gold_ids=tuple(e.id for e in context if e.id in gold_ids),
                    history=pair.history,
                )
            )
            rag_pairs.append(pair)
        if layout in ("closed", "both"):
            out.append(SFTExample(pair.question, pair.answer, "closed", pair.group, pair.source, history=pair.history))

    n_refusals = round(refusal_fraction * len(rag_pairs)) if len(rag_pairs) > 1 else 0
    for pair in rng.sample(rag_pairs, n_refusals):
        own = {e.id for e in pair.gold_entries()} | {pair.group}
        answer_key = _norm_key(pair.answer)
        others = [p for p in rag_pairs if p.group != pair.group]
        if not others:
            continue
        donor = rng.choice(others)
        context = [e for e in retrieved(donor.question)[:k] if e.id not in own and _norm_key(e.answer) != answer_key]
        if not context:
            context = [donor.gold_entries()[0]]
        out.append(
            SFTExample(
                pair.question,
                REFUSAL,
                "rag",
                pair.group,
                f"{pair.source}(refusal)",
                context=tuple(context),
                history=pair.history,
                refusal=True,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one example; the labels are ``input_ids[prompt_len:]`` (the answer + end of turn)."""

    input_ids: tuple[int, ...]
    prompt_len: int
    source: str = ""
    layout: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_answer_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len

    def labels(self) -> list[int]:
        """-100 over the prompt (ignored by the loss), the token ids over the answer and its end."""
        return [-100] * self.prompt_len + list(self.input_ids[self.prompt_len :])


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token(s) the chat template puts right after an assistant's message, up to the stop token.

    ``<|im_end|>`` for ChatML models like SmolLM2; found by rendering a probe conversation, so any
    template works. Falls back to the eos token.
    """
    probe = "Probe answer 7Q"
    eos = tokenizer.eos_token_id
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:  # a tokenizer without a chat template
        return [eos] if eos is not None else []
    assert isinstance(text, str)
    tail = text[text.rfind(probe) + len(probe) :]
    ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    special = set(tokenizer.all_special_ids)
    for i, token in enumerate(ids):
        if token in special:
            return ids[: i + 1]
    return [eos] if eos is not None else []


def _tokenize_one(
    ex: SFTExample, tokenizer: PreTrainedTokenizerBase, end: list[int], budget: int
) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)`` of ``ex``, shortened to fit ``budget`` where it can be."""
    from chatbot.models import chat_token_ids

    answer_ids = list(tokenizer(ex.answer, add_special_tokens=False)["input_ids"]) + end
    context, history = list(ex.context), list(ex.history)
    prompt = chat_token_ids(tokenizer, ex.messages(context, tuple(history)))
    while len(prompt) + len(answer_ids) > budget:
        droppable = [i for i, e in enumerate(context) if e.id not in ex.gold_ids or ex.refusal]
        if droppable and (len(context) > 1 or ex.refusal):
            del context[droppable[-1]]
        elif history:
            del history[: min(2, len(history))]  # one user turn and its answer
        else:
            break
        prompt = chat_token_ids(tokenizer, ex.messages(context, tuple(history)))
    return prompt, answer_ids


def tokenize_examples(
    examples: Sequence[SFTExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[TokenizedExample]:
    """Tokenize every example within ``max_length`` tokens, or raise DataError naming the ones that cannot.

    An example that is too long loses, in this order, its lowest-ranked non-gold context entries
    and its oldest turns; only if the answer still does not fit is it reported.
    """
    end = end_of_turn_ids(tokenizer)
    problems: list[Problem] = []
    out: list[TokenizedExample] = []
    for ex in examples:
        prompt, answer_ids = _tokenize_one(ex, tokenizer, end, max_length)
        total = len(prompt) + len(answer_ids)
        if total > max_length:
            problems.append(
                Problem(
                    f"{ex.source} ({ex.layout})",
                    f"{total} tokens even with the context shortened ({len(answer_ids)} of them the answer); "
                    f"finetune.max_length is {max_length}",
                    f"raise --max-length to at least {total}, or shorten the answer",
                )
            )
            continue
        out.append(TokenizedExample(tuple(prompt + answer_ids), len(prompt), ex.source, ex.layout))
    if problems:
        raise DataError(problems, title="examples longer than finetune.max_length")
    return out


@dataclass
class FittedExamples:
    """What :func:`fit_examples` trained on, the length budget it used and what it left out."""

    examples: list[TokenizedExample]
    max_length: int
    """The budget used: ``finetune.max_length``, grown to fit the longest example up to the limit."""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    """``{"source", "layout", "tokens"}`` of each example longer than the model's context."""

    def stats(self, configured: int) -> dict[str, Any]:
        return {"max_length": configured, "max_length_used": self.max_length, "skipped_too_long": self.skipped}


def fit_examples(
    examples: Sequence[SFTExample], tokenizer: PreTrainedTokenizerBase, max_length: int, *, limit: int
) -> FittedExamples:
    """Tokenize every example without failing on long ones (#15 item 7).

    Examples that do not fit ``max_length`` even shortened make the budget grow to the longest of
    them, up to ``limit`` (the model's context); the few longer than that are skipped and listed.
    One long FAQ answer therefore never blocks a run, and nothing is silently truncated."""
    end = end_of_turn_ids(tokenizer)
    fitted: list[tuple[SFTExample, list[int], list[int]]] = []
    for ex in examples:
        prompt, answer_ids = _tokenize_one(ex, tokenizer, end, max_length)
        fitted.append((ex, prompt, answer_ids))
    longest = max((len(p) + len(a) for _, p, a in fitted), default=0)
    budget = max(max_length, min(longest, max(limit, max_length)))
    out: list[TokenizedExample] = []
    skipped: list[dict[str, Any]] = []
    for ex, prompt, answer_ids in fitted:
        if len(prompt) + len(answer_ids) > budget:
            prompt, answer_ids = _tokenize_one(ex, tokenizer, end, budget)
            if len(prompt) + len(answer_ids) > budget:
                skipped.append({"source": ex.source, "layout": ex.layout, "tokens": len(prompt) + len(answer_ids)})
                continue
        out.append(TokenizedExample(tuple(prompt + answer_ids), len(prompt), ex.source, ex.layout))
    return FittedExamples(out, budget, skipped)


def dataset_hash(examples: Sequence[TokenizedExample]) -> str:
    """A fingerprint of exactly what is trained on (token ids and label boundaries, in order)."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.prompt_len, ex.input_ids]).encode("ascii"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The whole pipeline


@dataclass
class PreparedData:
    """Train and eval examples with the pairs they came from and counts for the report."""

    train: list[SFTExample]
    eval: list[SFTExample]
    train_pairs: list[QAPair]
    eval_pairs: list[QAPair]
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_data(
    pairs: Sequence[QAPair],
    *,
    layout: Literal["rag", "closed", "both"],
    eval_fraction: float,
    seed: int,
    eval_pairs: Sequence[QAPair] | None = None,
    retrieve: Retrieve | None = None,
    k: int = 3,
    refusal_fraction: float = 0.1,
) -> PreparedData:
    """Dedupe, split by FAQ entry (or hold out ``eval_pairs``), and render both splits.

    With explicit ``eval_pairs``, training pairs sharing a group or a question with them are dropped,
    so an eval file never leaks into training either.
    """
    if not pairs:
        raise DataError([Problem("training data", "no question/answer pairs", "add FAQ entries, or give --train FILE")])
    unique, duplicates = dedupe(pairs)
    if eval_pairs is None:
        train_pairs, held_out = split_by_group(unique, eval_fraction, seed)
        leaked = 0
    else:
        held_out, _ = dedupe(eval_pairs)
        groups = {p.group for p in held_out}
        questions = {_norm_key(p.question) for p in held_out}
        train_pairs = [p for p in unique if p.group not in groups and _norm_key(p.question) not in questions]
        leaked = len(unique) - len(train_pairs)
    if not train_pairs:
        raise DataError(
            [Problem("training data", "nothing left to train on after holding out the eval split", "add data")]
        )
    eval_ids = {p.group for p in held_out} | {e.id for p in held_out for e in p.gold}
    train = build_examples(
        train_pairs,
        layout=layout,
        retrieve=retrieve,
        k=k,
        refusal_fraction=refusal_fraction,
        exclude_ids=eval_ids - {p.group for p in train_pairs},
        seed=seed,
    )
    evals = build_examples(
        held_out, layout=layout, retrieve=retrieve, k=k, refusal_fraction=refusal_fraction, seed=seed + 1
    )
    stats = {
        "pairs": len(pairs),
        "duplicates_dropped": duplicates,
        "dropped_overlapping_eval": leaked,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(held_out),
        "train_groups": len({p.group for p in train_pairs}),
        "eval_groups": len({p.group for p in held_out}),
        "train_examples": len(train),
        "eval_examples": len(evals),
        "train_refusals": sum(e.refusal for e in train),
        "layout": layout,
    }
    return PreparedData(train, evals, list(train_pairs), list(held_out), stats)
