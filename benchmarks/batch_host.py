"""Host-side cost of the batch scheduler per decode step, on CPU with a tiny model (issue #18).

On a GPU the captured decode step of a small batch takes a few milliseconds, so whatever Python
does around it (admitting joiners, handing out tokens, the streams' detokenising competing for the
GIL) decides the many-user throughput. This measures that Python part where no GPU is needed: a
2-layer, 64-wide model (the 1.5B benchmark shape shrunk, the real 49k vocabulary) whose forward is
cheap, ``--users`` concurrent streams through the product path (``LocalGenerator`` with its batch
scheduler) with long answers, and prints per decode step:

- wall time per step, the part inside the model's forward (prefills and decode steps, timed
  around ``model.forward``), the part choosing tokens (``_pick``: repetition penalty and argmax
  over the vocabulary, device work on a GPU but slow on CPU), and the rest: the host's Python;
- the CPU seconds the streams' threads spent per step (detokenising, waking up), which compete for
  the GIL with the scheduler.

Run it before and after a change to the scheduler or the streams (same machine, same load).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m benchmarks.batch_host --users 32 --tokens 256
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=32, help="concurrent streams (= batch slots)")
    parser.add_argument("--tokens", type=int, default=256, help="answer length of every stream")
    parser.add_argument("--rounds", type=int, default=2, help="answers per user, back to back")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.gpu import PROMPT_TOKENS, build_model, load_tokenizer, shape_config, user_messages
    from chatbot.generation import LocalGenerator
    from chatbot.models import LoadedModel, quiet_transformers
    from chatbot.settings import load_settings

    quiet_transformers()
    torch.manual_seed(0)
    device, dtype = torch.device("cpu"), torch.float32
    model = build_model(shape_config("1.5b", tiny=True), device, dtype)
    with torch.no_grad():  # spread weights: varied text (the default init mostly repeats one token)
        for p in model.parameters():
            p.normal_(0, 0.3)
    tokenizer = load_tokenizer()
    forward_s, pick_s = [0.0], [0.0]
    plain_forward = model.forward

    @functools.wraps(plain_forward)  # keeps the signature: the scheduler reads its cache keyword
    def timed_forward(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return plain_forward(*a, **kw)
        finally:
            forward_s[0] += time.perf_counter() - start

    model.forward = timed_forward
    loaded = LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype, name="tiny")
    data_dir = Path(tempfile.mkdtemp(prefix="batch-host-"))
    settings = load_settings(env={}, overrides={"data_dir": str(data_dir)})
    window = PROMPT_TOKENS + args.tokens + 32
    model_settings = dataclasses.replace(
        settings.model, batching="on", compile="off", context_window=window, max_new_tokens=args.tokens
    )
    generator = LocalGenerator(model_settings, data_dir, loaded=loaded, slots=args.users)
    scheduler = generator.scheduler
    assert scheduler is not None
    scheduler.ready.wait()
    plain_pick = scheduler._pick

    def timed_pick(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return plain_pick(*a, **kw)
        finally:
            pick_s[0] += time.perf_counter() - start

    scheduler._pick = timed_pick  # type: ignore[method-assign]
    scheduler.eos_ids = set()  # every answer runs to its limit: the same work before and after a change
    messages = [user_messages(tokenizer, u, PROMPT_TOKENS) for u in range(args.users)]
    stream_cpu: list[float] = []
    lock = threading.Lock()

    def customer(u: int) -> None:
        cpu = 0.0
        for _ in range(args.rounds):
            t0 = time.thread_time()
            text = "".join(generator.stream(messages[u], max_new_tokens=args.tokens))
            cpu += time.thread_time() - t0
            assert text, "empty answer"
        with lock:
            stream_cpu.append(cpu)

    before = scheduler.stats()
    forward_s[0] = pick_s[0] = 0.0
    threads = [threading.Thread(target=customer, args=(u,)) for u in range(args.users)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = scheduler.stats()
    generator.close()
    steps = after["steps"] - before["steps"]
    tokens = after["tokens"] - before["tokens"]
    figures = {
        "users": args.users,
        "steps": steps,
        "tokens": tokens,
        "wall_ms_per_step": 1000 * wall / steps,
        "forward_ms_per_step": 1000 * forward_s[0] / steps,
        "sampling_ms_per_step": 1000 * pick_s[0] / steps,
        "host_python_ms_per_step": 1000 * (wall - forward_s[0] - pick_s[0]) / steps,
        "stream_cpu_ms_per_step": 1000 * sum(stream_cpu) / steps,
        "tok_s": tokens / wall,
    }
    for key, value in figures.items():
        print(f"{key:>24}: {value:,.2f}" if isinstance(value, float) else f"{key:>24}: {value}")
    return figures


if __name__ == "__main__":
    main()
