"""Text generation: a base with one required method, a local transformers backend, an OpenAI client.

:class:`Generator` needs only :meth:`~Generator.stream`; everything else (``generate``, token
counting, adapters) has a default built on it. Two backends:

- :class:`LocalGenerator` runs the model in this process (CUDA + bf16 when available, else CPU
  float32, optionally int8 on CPU), streams with ``TextIteratorStreamer`` from a background thread,
  trims the prompt to the context window and swaps LoRA adapters at run time.
- :class:`OpenAIGenerator` streams from any OpenAI-compatible server (vLLM, llama.cpp, TGI...) over
  server-sent events: generation scales out there, not here.

Concurrency: with ``model.batching`` on (the default on CUDA) a :class:`~chatbot.batching.BatchScheduler`
serves up to ``server.generation_concurrency`` conversations in one batch: they share every decode
step (compiled with CUDA graphs on a GPU), join and leave between steps, and the rest queue in FIFO
order. Without it (the CPU default) one generation runs at a time (HF models are not safe for
concurrent ``generate`` calls); other callers wait for the lock. Either way an abandoned stream (the
consumer stops iterating and the generator is closed or garbage collected) stops at the next token.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatbot.models import LoadedModel, chat_token_ids, load_model
from chatbot.prompts import load_prompt
from chatbot.settings import ModelSettings
from knowledge_base.errors import NotFoundError, SupportBotError

if TYPE_CHECKING:
    import httpx
    import torch

    from chatbot.batching import BatchScheduler

__all__ = ["Generator", "LocalGenerator", "OpenAIGenerator", "make_generator"]

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class Generator(ABC):
    """Turns chat messages into an answer. Subclasses implement :meth:`stream` only."""

    #: The model name reported with every answer.
    name: str = "generator"
    #: The active adapter's version (or folder name); None when the plain model answers.
    adapter: str | None = None
    #: True when the backend queues and batches concurrent streams itself (callers need no semaphore).
    batches: bool = False

    @abstractmethod
    def stream(self, messages: Messages, *, max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield the answer's text in chunks as they are generated."""

    def generate(self, messages: Messages, *, max_new_tokens: int | None = None) -> str:
        """The whole answer at once."""
        return "".join(self.stream(messages, max_new_tokens=max_new_tokens))

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``; a rough estimate (4 characters a token) unless the backend knows better."""
        return len(text) // 4 + 1

    def set_adapter(self, path: Path | None, version: str | None = None) -> None:
        """Serve with the LoRA adapter in ``path`` from now on (None: the plain model)."""
        raise SupportBotError(
            f"the {type(self).__name__} backend ({self.name}) cannot switch LoRA adapters",
            fix="use model.backend = 'local' to serve adapters, or load the adapter in the model server",
        )

    def close(self) -> None:
        """Release resources (connections); the generator is unusable afterwards."""
        return None


# --------------------------------------------------------------------------------------------------
# Local transformers model


@functools.cache
def _stop_flag_class() -> type:
    """A ``StoppingCriteria`` that ends generation once an event is set (built lazily: no torch import)."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenSet(StoppingCriteria):
        def __init__(self, event: threading.Event) -> None:
            self.event = event

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
            flag = torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)
            return flag.to(input_ids.device)  # type: ignore[return-value]

    return StopWhenSet


def _quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantization of every Linear layer (a quantized copy; ``model`` is untouched).

    ``torch.ao.quantization.quantize_dynamic`` still works in torch 2.13 but is deprecated in favour
    of torchao (not a dependency); its deprecation warnings are silenced here, where we chose it.
    """
    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        quantized = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    return quantized.eval()


def _strip_tuner_layers(model: torch.nn.Module) -> None:
    """Put back the original modules wherever peft injected adapter layers into ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            original: Any = module.get_base_layer()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, child, None) is module:
                setattr(parent, child, original)
    if hasattr(model, "peft_config"):
        del model.peft_config


def _context_separator() -> str:
    """The text between the FAQ entries and the question in the ``context`` prompt."""
    template = load_prompt("context")
    start, end = template.find("{context}"), template.find("{question}")
    if start < 0 or end < start:
        return ""
    return template[start + len("{context}") : end]


class LocalGenerator(Generator):
    """A transformers causal LM in this process, with an optional LoRA adapter.

    ``loaded`` is the :class:`~chatbot.models.LoadedModel` that answers now (its ``model`` is the
    int8 copy and/or the adapter-wrapped model when those are active), for benchmarks and tests.

    With ``cpu_speedup="int8"`` the fp32 base is kept next to its int8 copy, so an adapter can be
    attached later: the adapter is merged into a copy of the base and that merged model is quantized.
    """

    def __init__(
        self, settings: ModelSettings, data_dir: Path, *, loaded: LoadedModel | None = None, slots: int = 1
    ) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir)
        base = loaded if loaded is not None else load_model(settings, self.data_dir)
        self.name = base.name
        self.adapter = None
        self.tokenizer = base.tokenizer
        self._base = base.model  # the plain model, never quantized
        self._base_loaded = base
        self._peft: Any = None  # PeftModel wrapping self._base while an adapter is attached (not int8)
        self._adapter_path: Path | None = None
        self._lock = threading.Lock()
        self._int8 = False
        if settings.cpu_speedup == "int8":
            if base.device.type == "cpu":
                self._int8 = True
            else:
                log.info("model.cpu_speedup=int8 ignored: the model runs on %s, not on the CPU", base.device)
        self._separator = _context_separator()
        self.loaded = base
        self._serve(self._base)
        self._batch: BatchScheduler | None = None
        self._originals: list[tuple[Any, Any]] = []  # (weight, pristine copy) while an adapter is merged
        use_batching = settings.batching == "on" or (settings.batching == "auto" and base.device.type == "cuda")
        if use_batching and self._int8:
            log.info("model.batching ignored: int8 models decode one at a time")
        elif use_batching:
            try:
                self._batch = self._start_batching(max(1, slots))
                self.batches = True
            except ValueError as exc:
                log.warning("model.batching off for %s: %s; one generation at a time", self.name, exc)

    def _start_batching(self, slots: int) -> BatchScheduler:
        from chatbot.batching import BatchScheduler

        kwargs = self._generate_kwargs(1)
        window = self.settings.context_window
        sampling = self.settings.temperature > 0
        return BatchScheduler(
            self._base,
            slots=slots,
            # Room after the longest conversation, so moving rows back to the start stays rare.
            max_len=window + max(64, window // 4),
            eos_ids=kwargs["eos_token_id"] or [],
            temperature=self.settings.temperature if sampling else 0.0,
            top_p=self.settings.top_p if sampling else 1.0,
            repetition_penalty=self.settings.repetition_penalty,
            compile=self.settings.compile == "auto",
            name=self.name,
        )

    @property
    def scheduler(self) -> BatchScheduler | None:
        """The batch scheduler when batching is on (its ``stats()``, ``ready``), else None."""
        return self._batch

    # -- internals ---------------------------------------------------------------------------------

    def _serve(self, model: Any) -> None:
        """Make ``model`` the one that answers (quantized first when int8 is on). Caller holds the lock."""
        if self._int8:
            model = _quantize_int8(model)
        model.eval()
        self._model = model
        self.loaded = dataclasses.replace(self._base_loaded, model=model)

    def _detach_adapter(self) -> None:
        for weight, pristine in self._originals:
            weight.data.copy_(pristine)
        self._originals = []
        if self._peft is not None:
            # unload() takes the LoRA layers out again, leaving the base exactly as it was.
            self._base = self._peft.unload()
            self._peft = None

    def _activate(self, path: Path | None) -> None:
        self._detach_adapter()
        if path is None:
            self._serve(self._base)
            return
        from peft import PeftModel

        if self._batch is not None:
            # Merged into the base weights in place: the batch's (compiled) step keeps its module and
            # buffers, so no recompile; the touched weights are kept on the CPU to restore them.
            from peft.tuners.tuners_utils import BaseTunerLayer

            try:
                peft = PeftModel.from_pretrained(self._base, str(path))
                for module in peft.modules():
                    if isinstance(module, BaseTunerLayer):
                        weight: Any = module.get_base_layer().weight
                        self._originals.append((weight, weight.detach().to("cpu", copy=True)))
                peft.merge_and_unload()
            finally:
                _strip_tuner_layers(self._base)
            return
        if self._int8:
            # Quantized layers cannot carry LoRA: merge into a copy of the base, then quantize that.
            merged = PeftModel.from_pretrained(copy.deepcopy(self._base), str(path)).merge_and_unload()
            self._serve(merged)
        else:
            try:
                self._peft = PeftModel.from_pretrained(self._base, str(path))
            except Exception:
                # A failed load (e.g. shape mismatch) leaves LoRA layers injected into the base.
                _strip_tuner_layers(self._base)
                raise
            self._serve(self._peft)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _render(self, messages: Messages) -> list[int]:
        return chat_token_ids(self.tokenizer, messages)

    def _fit(self, messages: Messages, max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt ids that leave room for the answer in the context window, and the answer budget.

        Drops the oldest turns first (never system messages nor the last user message), then shortens
        the last user message: the FAQ context is cut from its end (entries are best first) so the
        question stays whole; a message without that layout loses its beginning. Never raises for
        length: as a last resort the rendered prompt keeps its last tokens.
        """
        window = self.settings.context_window
        # Keep at least a quarter of the window for the prompt, whatever max_new_tokens says.
        budget = max(window - max_new_tokens, window // 4)
        max_new_tokens = min(max_new_tokens, window - budget)
        msgs = [dict(m) for m in messages]
        ids = self._render(msgs)
        if len(ids) <= budget:
            return ids, max_new_tokens
        before = len(ids)
        users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
        protected = {id(msgs[-1]), *(id(msgs[i]) for i in users[-1:])}

        def oldest_turn() -> int | None:
            return next((i for i, m in enumerate(msgs) if m.get("role") != "system" and id(m) not in protected), None)

        while len(ids) > budget and (index := oldest_turn()) is not None:
            del msgs[index]
            # Templates that demand alternating roles break on a history that starts with the assistant.
            if oldest_turn() == index and msgs[index].get("role") == "assistant":
                del msgs[index]
            ids = self._render(msgs)
        if len(ids) > budget and msgs:
            user_turns = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
            ids = self._shorten(msgs, user_turns[-1] if user_turns else len(msgs) - 1, budget)
        if len(ids) > budget:
            log.warning("prompt still %d tokens after trimming, keeping its last %d", len(ids), budget)
            ids = ids[-budget:]
        log.info("prompt trimmed from %d to %d tokens to fit model.context_window=%d", before, len(ids), window)
        return ids, max_new_tokens

    def _shorten(self, msgs: Messages, index: int, budget: int) -> list[int]:
        """Cut text until the prompt fits: first the FAQ context of ``msgs[index]`` (from its end, as
        entries come best first), then the longest of the system messages and that message (a system
        prompt keeps its beginning, the customer's message its end, where the question is)."""
        content = msgs[index].get("content", "")
        sep = self._separator
        cut = content.rfind(sep) if sep.strip() else -1
        ids = self._render(msgs)
        if cut >= 0:
            context, question = content[:cut], content[cut + len(sep) :]
            while len(ids) > budget and context:
                tokens = self._encode(context)
                context = str(self.tokenizer.decode(tokens[: max(len(tokens) - (len(ids) - budget) - 1, 0)]))
                if not context.strip():
                    context = ""
                msgs[index] = {**msgs[index], "content": context + sep + question if context else question}
                ids = self._render(msgs)
        for _ in range(32):
            over = len(ids) - budget
            if over <= 0:
                break
            sizes = {
                i: len(self._encode(m.get("content", "")))
                for i, m in enumerate(msgs)
                if i == index or m.get("role") == "system"
            }
            longest = max(sizes, key=lambda i: sizes[i])
            tokens = self._encode(msgs[longest].get("content", ""))
            if not tokens:
                break
            # Down to the next longest at most, so a long system prompt and a long message share the cut.
            others = max((n for i, n in sizes.items() if i != longest), default=0)
            step = min(over + 1, max(len(tokens) - others, over // 2 + 1))
            kept = tokens[step:] if longest == index else tokens[: len(tokens) - step]
            msgs[longest] = {**msgs[longest], "content": str(self.tokenizer.decode(kept))}
            ids = self._render(msgs)
        return ids

    def _generate_kwargs(self, max_new_tokens: int) -> dict[str, Any]:
        s = self.settings
        config = self._base.generation_config
        eos: list[int] = []
        for value in (self.tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
            for token in value if isinstance(value, list) else [value]:
                if token is not None and token not in eos:
                    eos.append(int(token))
        pad = self.tokenizer.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "repetition_penalty": s.repetition_penalty,
            "eos_token_id": eos or None,
            "pad_token_id": pad,
        }
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            kwargs["do_sample"] = False  # no temperature/top_p with greedy: transformers warns
        return kwargs

    # -- public API --------------------------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def stream(self, messages: Messages, *, max_new_tokens: int | None = None) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        wanted = max_new_tokens if max_new_tokens is not None else self.settings.max_new_tokens
        ids, budget = self._fit(messages, max(1, wanted))
        if self._batch is not None:
            yield from self._stream_batched(ids, budget)
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failures: list[BaseException] = []
        kwargs = self._generate_kwargs(budget)
        kwargs["stopping_criteria"] = StoppingCriteriaList([_stop_flag_class()(stop)])

        def work() -> None:
            try:
                # Poll the lock so a stream closed while it waits in the queue gives up at once.
                while not self._lock.acquire(timeout=0.05):
                    if stop.is_set():
                        return
                try:
                    if stop.is_set():
                        return
                    model, device = self._model, self.loaded.device
                    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
                    with torch.inference_mode():
                        model.generate(
                            input_ids=input_ids,
                            attention_mask=torch.ones_like(input_ids),
                            streamer=streamer,
                            **kwargs,
                        )
                finally:
                    self._lock.release()
            except BaseException as exc:  # surfaced in the consumer below
                failures.append(exc)
            finally:
                # Wakes the consumer whatever happened (generate() already ends the stream on success).
                streamer.on_finalized_text("", stream_end=True)

        thread = threading.Thread(target=work, name="supportbot-generate", daemon=True)
        thread.start()
        try:
            for text in streamer:
                if text:
                    yield text
        finally:
            stop.set()
            thread.join()
        if failures:
            exc = failures[0]
            if isinstance(exc, SupportBotError) or not isinstance(exc, Exception):
                raise exc
            raise SupportBotError(
                f"generation failed in model {self.name!r}: {type(exc).__name__}: {exc}",
                fix="see the log for the traceback; on a GPU, out-of-memory errors mean a smaller "
                "model.max_new_tokens or model.context_window",
            ) from exc

    def _stream_batched(self, ids: list[int], budget: int) -> Iterator[str]:
        """Stream one request through the batch scheduler; text is decoded here, off its loop."""
        assert self._batch is not None
        request = self._batch.submit(ids, budget)
        tokens: list[int] = []
        sent = ""
        try:
            while (token := request.next_token()) is not None:
                tokens.append(token)
                text = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
                # Hold back a split multi-byte character until its last byte arrives.
                if text.endswith("\ufffd") or not text.startswith(sent):
                    continue
                if len(text) > len(sent):
                    yield text[len(sent) :]
                    sent = text
            text = str(self.tokenizer.decode(tokens, skip_special_tokens=True))
            if text.startswith(sent) and len(text) > len(sent):
                yield text[len(sent) :]
        except SupportBotError:
            raise
        except Exception as exc:
            raise SupportBotError(
                f"generation failed in model {self.name!r}: {type(exc).__name__}: {exc}",
                fix="see the log for the traceback; on a GPU, out-of-memory errors mean a smaller "
                "server.generation_concurrency, model.max_new_tokens or model.context_window",
            ) from exc
        finally:
            request.cancel()
        if request.waited_s > 1.0:
            log.info("generation waited %.1f s for a batch slot", request.waited_s)

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()

    def set_adapter(self, path: Path | None, version: str | None = None) -> None:
        """Serve with the peft LoRA adapter in ``path`` (None: the base model), without a restart.

        Waits for the running generation to finish (with batching: for the running batch to drain;
        queued requests then start with the new adapter, none is dropped). On failure the previous
        adapter stays active (or, if that cannot be restored either, the base model) and a
        SupportBotError is raised.
        """
        if path is not None:
            path = Path(path)
            if not (path / "adapter_config.json").is_file():
                raise NotFoundError(
                    f"no LoRA adapter in {path} (adapter_config.json is missing)",
                    fix="give a folder written by `supportbot finetune` or peft's save_pretrained",
                )
        if self._batch is not None:
            self._batch.between_batches(lambda: self._apply_adapter(path, version))
        else:
            self._apply_adapter(path, version)
        log.info("model %s now serves adapter %s", self.name, self.adapter or "none")

    def _apply_adapter(self, path: Path | None, version: str | None) -> None:
        with self._lock:
            previous, previous_name = self._adapter_path, self.adapter
            try:
                self._activate(path)
            except Exception as exc:
                try:
                    self._activate(previous)
                except Exception:
                    self._activate(None)
                    previous, previous_name = None, None
                self._adapter_path, self.adapter = previous, previous_name
                raise SupportBotError(
                    f"cannot load the LoRA adapter in {path}: {type(exc).__name__}: {exc}",
                    fix=f"check that the adapter was trained for {self.name!r} (adapter_config.json, "
                    "base_model_name_or_path) and that its files are complete; "
                    f"now serving adapter {previous_name or 'none'}",
                ) from exc
            self._adapter_path = path
            self.adapter = None if path is None else (version or path.name)


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible server


def _http_fix(status: int) -> str:
    if status in (401, 403):
        return "check model.openai_api_key (SUPPORTBOT_MODEL_OPENAI_API_KEY)"
    if status == 404:
        return "check model.openai_base_url (it usually ends in /v1) and model.openai_model"
    if status in (400, 422):
        return "check model.openai_model and that the server accepts these parameters"
    if status == 429:
        return "the server is rate limiting: retry later or raise its limits"
    return "check the model server's logs and that it is healthy"


class OpenAIGenerator(Generator):
    """Streams answers from an OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp...).

    ``model`` is sent only when ``openai_model`` is set (servers with one model, like vLLM, accept
    requests without it).
    """

    def __init__(self, settings: ModelSettings, *, client: httpx.Client | None = None) -> None:
        if not settings.openai_base_url:
            raise SupportBotError(
                "model.backend is 'openai' but model.openai_base_url is empty",
                fix="set SUPPORTBOT_MODEL_OPENAI_BASE_URL, e.g. http://localhost:8000/v1",
            )
        self.settings = settings
        self.name = settings.openai_model or "openai"
        self.adapter = None
        self.url = settings.openai_base_url.rstrip("/") + "/chat/completions"
        import httpx  # here, not at import: the local backend (and a bare GPU box) needs no HTTP client

        self._own_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=settings.request_timeout_s)

    def close(self) -> None:
        if self._own_client:
            self._client.close()

    def _payload(self, messages: Messages, max_new_tokens: int | None) -> dict[str, Any]:
        s = self.settings
        payload: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "max_tokens": max_new_tokens if max_new_tokens is not None else s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
        }
        if s.openai_model:
            payload = {"model": s.openai_model, **payload}
        return payload

    def stream(self, messages: Messages, *, max_new_tokens: int | None = None) -> Iterator[str]:
        import httpx

        headers = {"Accept": "text/event-stream"}
        if self.settings.openai_api_key:
            headers["Authorization"] = f"Bearer {self.settings.openai_api_key}"
        url = self.url
        try:
            with self._client.stream(
                "POST",
                url,
                json=self._payload(messages, max_new_tokens),
                headers=headers,
                timeout=self.settings.request_timeout_s,
            ) as response:
                if response.status_code >= 400:
                    body = response.read().decode("utf-8", "replace").strip()
                    raise SupportBotError(
                        f"the model server at {url} answered HTTP {response.status_code}: {body[:300]}",
                        fix=_http_fix(response.status_code),
                    )
                for line in response.iter_lines():
                    text = self._parse_line(line, url)
                    if text is None:
                        return
                    if text:
                        yield text
        except httpx.TimeoutException as exc:
            raise SupportBotError(
                f"the model server at {url} did not answer within {self.settings.request_timeout_s:g} s "
                f"({type(exc).__name__})",
                fix="check that the server is up and not overloaded, or raise model.request_timeout_s",
            ) from exc
        except httpx.HTTPError as exc:
            raise SupportBotError(
                f"cannot reach the model server at {url}: {type(exc).__name__}: {exc}",
                fix="check model.openai_base_url (SUPPORTBOT_MODEL_OPENAI_BASE_URL) and that the server "
                "is running and reachable from here",
            ) from exc

    @staticmethod
    def _parse_line(line: str, url: str) -> str | None:
        """The text in one SSE line: "" for lines without any, None at ``data: [DONE]``."""
        if not line.startswith("data:"):
            return ""  # blank separators, comments (":"), event/id fields
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        if not data:
            return ""
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise SupportBotError(
                f"the model server at {url} sent an event that is not JSON: {data[:200]!r}",
                fix="check that model.openai_base_url points at an OpenAI-compatible API",
            ) from exc
        if not isinstance(event, dict):
            return ""
        if "error" in event:
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise SupportBotError(
                f"the model server at {url} reported an error: {message}",
                fix="check the model server's logs",
            )
        choices = event.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            return ""
        delta = choices[0].get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) else ""


def make_generator(settings: ModelSettings, data_dir: Path, *, slots: int = 1) -> Generator:
    """The generator the settings ask for: an OpenAI-compatible server or the local model
    (``slots``: conversations decoded in one batch when batching is on)."""
    if settings.backend == "openai":
        return OpenAIGenerator(settings)
    return LocalGenerator(settings, data_dir, slots=slots)
