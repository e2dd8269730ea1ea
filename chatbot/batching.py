"""Continuous batching for the local model: many conversations share each decode step.

A :class:`BatchScheduler` owns one static KV cache of ``slots`` rows and one thread. Requests queue
in FIFO order; between two decode steps the thread admits waiting requests into free rows (their
prompts are prefilled together, then copied into their rows), runs one decode step for every
occupied row, reads the new tokens back with a single host sync and hands each request its token.
A request leaves its row when it hits an end-of-sequence token, its own token limit, or is
cancelled; the row is free for the next request at the next step.

Why our own scheduler and not transformers' ``generate_batch``: on an H200 its eager paged-attention
loop served 258 tok/s to 32 users where a static cache with a captured (CUDA-graph) step of the
same batch served 4,585 (issue #18). A static batch needs fixed shapes, so every row shares one
time axis (the cache's write index ``t``): a request's prompt is placed to end at ``t`` and its
tokens follow; an attention mask per row hides everything else. RoPE positions are per row, so
where a row sits on the time axis does not change its numbers. When the axis runs out, the active
rows are moved back to its start (``_rebase``), outside the captured step.

On CUDA the decode step is compiled (``torch.compile(mode="reduce-overhead")``: CUDA graphs) once at
start, on the scheduler's own thread, before the first request is served; if compiling fails the
step runs eagerly (logged). On CPU the step is always eager.
"""

from __future__ import annotations

import collections
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["BatchRequest", "BatchScheduler"]

log = logging.getLogger(__name__)

#: Most prompt tokens prefilled in one forward pass (joiners beyond it wait for the next round).
PREFILL_TOKENS = 8192
_END = -1  # queue marker: the request is over


@dataclass(eq=False)
class BatchRequest:
    """One generation in the scheduler: its prompt, limit, token queue and timings."""

    prompt: list[int]
    max_new_tokens: int
    queued_at: float = field(default_factory=time.perf_counter)
    #: Requests ahead of this one when it was queued (0: it is next).
    queue_position: int = 0
    tokens: queue.SimpleQueue[int] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None
    started_at: float | None = None
    generated: int = 0
    error: BaseException | None = None
    finished: bool = False

    @property
    def waited_s(self) -> float:
        """Seconds spent in the queue (so far, while still queued)."""
        return (self.started_at or time.perf_counter()) - self.queued_at

    def cancel(self) -> None:
        """Give up: the scheduler frees the row (or drops the queued request) before its next step."""
        self.cancelled.set()

    def next_token(self, timeout: float | None = None) -> int | None:
        """The next generated token id, or None once the request is over (raises its error, if any)."""
        token = self.tokens.get(timeout=timeout)
        if token == _END:
            self.tokens.put(_END)  # later calls see the end too
            if self.error is not None:
                raise self.error
            return None
        return token


def cache_argument(model: Any) -> str:
    """The forward keyword for the KV cache: ``cache`` from transformers 5.2x, ``past_key_values`` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class BatchScheduler:
    """A static batch of ``slots`` rows served by one thread (see the module docstring).

    ``model`` is a transformers causal LM whose attention takes a 4D mask (sdpa or eager);
    ``max_len`` is the time axis of the cache (at least the longest prompt + answer, plus room so
    rebases stay rare); ``compile`` captures the decode step (CUDA only).
    """

    def __init__(
        self,
        model: Any,
        *,
        slots: int,
        max_len: int,
        eos_ids: list[int],
        temperature: float = 0.0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        compile: bool = False,
        name: str = "model",
    ) -> None:
        import torch

        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.model = model
        self.slots = slots
        self.max_len = max_len
        self.eos_ids = set(eos_ids)
        self.temperature = temperature
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty
        self.name = name
        self.device = next(model.parameters()).device
        self._cache_kw = cache_argument(model)
        attention = getattr(model.config, "_attn_implementation", None) or "sdpa"
        if attention not in ("sdpa", "eager"):
            # flash / flex kernels take no 4D mask: each row's span could not be masked.
            raise ValueError(f"batching needs sdpa or eager attention, the model uses {attention!r}")
        self._eager_attention = attention == "eager"
        self._cond = threading.Condition()
        self._queue: collections.deque[BatchRequest] = collections.deque()
        self._rows: list[BatchRequest | None] = [None] * slots
        self._between: list[tuple[Callable[[], None], threading.Event, list[BaseException]]] = []
        self._closed = False
        self._want_compile = compile and self.device.type == "cuda"
        self._step_fn: Callable[..., Any] = model
        #: "eager", "compiling", "compiled" or "eager (compile failed: ...)": what runs the decode step.
        self.step_mode = "compiling" if self._want_compile else "eager"
        self.ready = threading.Event()
        self.warmup_s = 0.0
        self.steps = 0
        self.rebases = 0
        self.tokens_out = 0  # tokens handed to requests, all time
        # Device state of the batch: the token each row feeds next, its RoPE position, its mask.
        dev = self.device
        self._next = torch.zeros((slots, 1), dtype=torch.long, device=dev)
        self._pos = torch.zeros((slots, 1), dtype=torch.long, device=dev)
        self._mask = torch.zeros((slots, max_len), dtype=torch.bool, device=dev)
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        self._seen = (
            torch.zeros((slots, self._vocab), dtype=torch.bool, device=dev) if repetition_penalty != 1.0 else None
        )
        self._start = [0] * slots  # first cache column of each row's span
        self._t = 0  # the shared write index (mirrors the cache's cumulative_length)
        self._cache = self._new_cache()
        self._thread = threading.Thread(target=self._run, name=f"supportbot-batch-{name}", daemon=True)
        self._thread.start()

    # -- public API --------------------------------------------------------------------------------

    def submit(self, prompt: list[int], max_new_tokens: int) -> BatchRequest:
        """Queue a generation; its tokens arrive on the returned request (``next_token``)."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {len(prompt)} + answer {max_new_tokens} tokens exceed the cache ({self.max_len})")
        with self._cond:
            if self._closed:
                raise RuntimeError("the batch scheduler is closed")
            request = BatchRequest(list(prompt), max(1, max_new_tokens), queue_position=len(self._queue))
            self._queue.append(request)
            busy = sum(r is not None for r in self._rows)
            self._cond.notify_all()
        if busy >= self.slots or request.queue_position:
            log.info(
                "generation queued at position %d (%d/%d batch slots busy)",
                request.queue_position + 1,
                busy,
                self.slots,
            )
        return request

    def between_batches(self, fn: Callable[[], None], timeout: float | None = None) -> None:
        """Run ``fn`` on the scheduler thread once the running batch has drained (no new request is
        admitted meanwhile; queued ones start right after). Raises what ``fn`` raises."""
        done, failures = threading.Event(), []  # type: ignore[var-annotated]
        with self._cond:
            if self._closed:
                fn()
                return
            self._between.append((fn, done, failures))
            self._cond.notify_all()
        if not done.wait(timeout):
            raise TimeoutError("the running batch did not drain in time")
        if failures:
            raise failures[0]

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "slots": self.slots,
                "active": sum(r is not None for r in self._rows),
                "queued": len(self._queue),
                "steps": self.steps,
                "rebases": self.rebases,
                "tokens": self.tokens_out,
                "step_mode": self.step_mode,
                "warmup_s": round(self.warmup_s, 2),
            }

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # -- the cache ---------------------------------------------------------------------------------

    def _new_cache(self) -> Any:
        import torch
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        # Allocate every layer now, outside any compiled region (static addresses for CUDA graphs).
        config = self.model.config.get_text_config(decoder=True)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        probe = torch.zeros((self.slots, heads, 1, head_dim), dtype=dtype, device=self.device)
        layers: list[Any] = list(cache.layers)
        if any(getattr(layer, "is_sliding", False) or not hasattr(layer, "cumulative_length") for layer in layers):
            # A sliding-window (ring) layer does not keep a row's span where the shared time axis says.
            raise ValueError("batching needs full-attention static cache layers (no sliding window)")
        for layer in layers:
            if not getattr(layer, "is_initialized", False):
                layer.lazy_initialization(probe, probe)
        return cache

    def _set_time(self, t: int) -> None:
        self._t = t
        for layer in self._cache.layers:
            layer.cumulative_length.fill_(t)

    def _rebase(self, t_new: int) -> None:
        """Move every active row's span to end at ``t_new`` (outside the captured step).

        Every span ends at ``t``, so all rows move by the same offset: one copy of the last ``m``
        columns (``m`` the longest span) per cache tensor, whatever the number of rows."""
        self.rebases += 1
        t = self._t
        m = max((t - self._start[row] for row, r in enumerate(self._rows) if r is not None), default=0)
        if t_new < m:
            raise ValueError(f"cannot rebase to {t_new}: a row spans {m} columns")
        if m and t_new != t:
            for layer in self._cache.layers:
                for tensor in (layer.keys, layer.values):
                    tensor[:, :, t_new - m : t_new] = tensor[:, :, t - m : t].clone()
            mask = self._mask[:, t - m : t].clone()
            self._mask.zero_()
            self._mask[:, t_new - m : t_new] = mask
        for row in range(self.slots):
            self._start[row] += t_new - t
        self._set_time(t_new)

    # -- the loop ----------------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                self._warm_up()
        finally:
            self.ready.set()
        while True:
            with self._cond:
                while not self._closed and not self._queue and not self._between and not any(self._rows):
                    self._cond.wait()
                if self._closed:
                    self._fail_all(RuntimeError("the batch scheduler was closed"))
                    return
                fn, joiners = None, []
                if self._between and not any(self._rows):
                    fn, done, failures = self._between.pop(0)
                elif not self._between:  # a pending switch admits no one until it has run
                    joiners = self._take_joiners()
            if fn is not None:
                try:
                    fn()
                except BaseException as exc:
                    failures.append(exc)
                finally:
                    done.set()
                continue
            try:
                with torch.inference_mode():
                    if joiners:
                        self._admit(joiners)
                    if any(self._rows):
                        self._step()
            except BaseException as exc:  # a failed step ends the batch's requests, not the thread
                log.exception("batch step failed")
                with self._cond:
                    for row, request in enumerate(self._rows):
                        if request is not None:
                            self._finish(row, request, exc)
                    for request in joiners:
                        if not request.finished:
                            request.error = exc
                            request.finished = True
                            request.tokens.put(_END)
                    self._reset()

    def _fail_all(self, exc: BaseException) -> None:
        for row, request in enumerate(self._rows):
            if request is not None:
                self._finish(row, request, exc)
        while self._queue:
            request = self._queue.popleft()
            request.error, request.finished = exc, True
            request.tokens.put(_END)

    def _take_joiners(self) -> list[BatchRequest]:
        """Pop queued requests (FIFO) for the free rows; drops cancelled ones. Caller holds the lock."""
        free = sum(r is None for r in self._rows)
        joiners: list[BatchRequest] = []
        tokens = 0
        while self._queue and len(joiners) < free:
            request = self._queue[0]
            if request.cancelled.is_set():
                self._queue.popleft()
                request.finished = True
                request.tokens.put(_END)
                continue
            if joiners and tokens + len(request.prompt) > PREFILL_TOKENS:
                break
            self._queue.popleft()
            tokens += len(request.prompt)
            joiners.append(request)
        for position, request in enumerate(self._queue):
            request.queue_position = position
        return joiners

    def _reset(self) -> None:
        self._rows = [None] * self.slots
        self._mask.zero_()
        self._set_time(0)

    def _finish(self, row: int, request: BatchRequest, error: BaseException | None = None) -> None:
        request.error = error
        request.finished = True
        request.tokens.put(_END)
        self._rows[row] = None

    def _admit(self, joiners: list[BatchRequest]) -> None:
        """Prefill the joiners together (left-padded), copy their KV into free rows, emit first tokens."""
        import torch
        from transformers import DynamicCache

        longest = max(len(r.prompt) for r in joiners)
        active = [r for r in self._rows if r is not None]
        if not active:
            self._set_time(longest)  # a fresh batch: start the time axis right after the prompts
        elif self._t < longest or self._t + max(r.max_new_tokens for r in joiners) > self.max_len:
            spans = [self._t - self._start[row] for row, r in enumerate(self._rows) if r is not None]
            self._rebase(max([longest, *spans]))
        dev = self.device
        ids = torch.full((len(joiners), longest), 0, dtype=torch.long)
        attention = torch.zeros((len(joiners), longest), dtype=torch.long)
        for i, request in enumerate(joiners):
            n = len(request.prompt)
            ids[i, longest - n :] = torch.tensor(request.prompt)
            attention[i, longest - n :] = 1
        ids, attention = ids.to(dev), attention.to(dev)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        prefill_cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=attention,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: prefill_cache},
        )
        logits = out.logits[:, -1, :].float()
        rows: list[int] = []
        t = self._t
        for i, request in enumerate(joiners):
            row = self._rows.index(None)
            rows.append(row)
            n = len(request.prompt)
            pairs: list[tuple[Any, Any]] = list(zip(self._cache.layers, prefill_cache.layers, strict=True))
            for layer, source in pairs:
                layer.keys[row, :, t - n : t] = source.keys[i, :, longest - n :]
                layer.values[row, :, t - n : t] = source.values[i, :, longest - n :]
            self._mask[row].zero_()
            self._mask[row, t - n : t] = True
            self._pos[row, 0] = n
            self._start[row] = t - n
            if self._seen is not None:
                self._seen[row].zero_()
                self._seen[row, torch.tensor(request.prompt, device=dev)] = True
            request.slot, request.started_at = row, time.perf_counter()
            self._rows[row] = request
        index = torch.tensor(rows, device=dev)
        first = self._pick(logits, index)
        self._emit(rows, first.tolist())

    def _pick(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of each row (greedy or sampled), on the device; updates the penalty state."""
        import torch

        seen = self._seen if rows is None or self._seen is None else self._seen[rows]
        if seen is not None:
            p = self.repetition_penalty
            logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
        if self.temperature > 0:
            logits = logits / self.temperature
            probs = torch.softmax(logits, dim=-1)
            if self.top_p < 1.0:
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                keep = sorted_probs.cumsum(-1) - sorted_probs < self.top_p
                sorted_probs = sorted_probs * keep
                probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
            chosen = torch.multinomial(probs, 1).squeeze(-1)
        else:
            chosen = logits.argmax(dim=-1)
        target = slice(None) if rows is None else rows
        self._next[target, 0] = chosen
        if self._seen is not None:
            if rows is None:
                self._seen.scatter_(1, chosen[:, None], True)
            else:
                self._seen[rows, chosen] = True
        return chosen

    def _emit(self, rows: list[int], tokens: list[int]) -> None:
        """Hand each row its token; end requests at EOS, at their limit, or when cancelled."""
        with self._cond:
            for row, token in zip(rows, tokens, strict=True):
                request = self._rows[row]
                if request is None:
                    continue
                if request.cancelled.is_set() or token in self.eos_ids:
                    self._finish(row, request)
                    continue
                request.generated += 1
                self.tokens_out += 1
                request.tokens.put(token)
                if request.generated >= request.max_new_tokens:
                    self._finish(row, request)
            self._cond.notify_all()

    def _inputs(self) -> dict[str, Any]:
        mask = self._mask[:, None, None, :]
        if self._eager_attention:
            import torch

            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=self.device).masked_fill(~mask, torch.finfo(dtype).min)
        return {
            "input_ids": self._next,
            "position_ids": self._pos,
            "attention_mask": mask,
            "use_cache": True,
            self._cache_kw: self._cache,
        }

    def _step(self) -> None:
        """One decode step for every row; one host sync to read the new tokens."""
        if self._t >= self.max_len:
            spans = [self._t - self._start[row] for row, r in enumerate(self._rows) if r is not None]
            self._rebase(max(spans))
        # Every row (free ones too) sees its current column: a row with nothing to attend to gives NaN.
        self._mask[:, self._t] = True
        try:
            if self._step_fn is not self.model:
                import torch

                torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed
            out = self._step_fn(**self._inputs())
        except Exception as exc:
            if self._step_fn is self.model:
                raise
            log.warning("compiled decode step failed (%s: %s); running eagerly from now on", type(exc).__name__, exc)
            self.step_mode = f"eager (compiled step failed: {type(exc).__name__})"
            self._step_fn = self.model
            self._set_time(self._t)
            out = self.model(**self._inputs())
        self._t += 1
        self.steps += 1
        chosen = self._pick(out.logits[:, -1, :].float())
        self._pos += 1
        self._emit(list(range(self.slots)), chosen.tolist())

    def _warm_up(self) -> None:
        """Compile and capture the decode step with dummy rows (CUDA only); eager if that fails."""
        if not self._want_compile:
            return
        import torch

        start = time.perf_counter()
        try:
            _cudagraph_thread_state()
            compiled = torch.compile(self.model, mode="reduce-overhead", dynamic=False)
            self._set_time(0)
            self._mask[:, 0] = True
            for _ in range(3):  # compile, record the CUDA graph, replay it
                torch.compiler.cudagraph_mark_step_begin()
                compiled(**self._inputs())
                self._set_time(0)
            # One small eager prefill too: its kernels load now, not in the first customer's TTFT.
            from transformers import DynamicCache

            ids = torch.zeros((1, 16), dtype=torch.long, device=self.device)
            self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: DynamicCache()})
            torch.cuda.synchronize(self.device)
            self._step_fn = compiled
            self.step_mode = "compiled"
        except Exception as exc:
            log.warning(
                "compiling the decode step failed (%s: %s); decoding eagerly", type(exc).__name__, exc, exc_info=True
            )
            self.step_mode = f"eager (compile failed: {type(exc).__name__})"
        finally:
            self._reset()
            self.warmup_s = time.perf_counter() - start
        log.info("decode step for %d slots: %s after %.1f s warm-up", self.slots, self.step_mode, self.warmup_s)


def _cudagraph_thread_state() -> None:
    """Give this thread the CUDA-graph-tree registry that torch sets up only in the importing thread.

    The decode step is compiled and replayed on the scheduler's own thread. torch before 2.13 keeps
    its CUDA graph trees in a ``threading.local`` filled at import, and in any other plain thread
    ``cudagraph_trees.get_obj`` fails a bare ``assert`` (seen on an H200 with torch 2.11: every
    compile fell back to eager). torch 2.13 initialises the registry lazily per thread; this does
    the same for older versions and nothing where it is already there.
    """
    import torch
    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if hasattr(local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    init = getattr(cudagraph_trees, "_initialize_tls", None)
    if init is not None:
        init(local)
        return
    from collections import defaultdict

    local.tree_manager_containers = {}
    local.tree_manager_locks = defaultdict(threading.Lock)
    torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)
