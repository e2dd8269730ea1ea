"""GPU serving benchmark: the product's batched, compiled decode against raw transformers, no download.

Builds random-initialised models from the configs in ``benchmarks/gpu_configs/`` (SmolLM2-135M,
Qwen2.5-1.5B and Llama-3-8B shapes, real vocabulary sizes; the SmolLM2 tokenizer) and prints, as
soon as each is measured:

- per load (1 / 8 / 32 concurrent users, 1.5B shape; users arrive staggered and ask for different
  answer lengths, so they join and leave the batch): aggregate decode tok/s and time to first token
  p50/p95 at 300-token prompts through the PRODUCT path (``LocalGenerator`` with its batch
  scheduler, the code the chat engine calls), against raw eager ``generate`` and raw
  static-cache + compiled ``generate`` of the same batch, with ratios;
- the memory-bound limit: weight bytes / memory bandwidth (from a measured device-to-device copy);
- the 8B shape for one user; the fine-tune recipe against a plain peft loop
  (``benchmarks.gpu_finetune.compare_finetune``, when present).

Sections run in order of importance and are skipped once ``--budget-s`` is spent. ``--tiny`` runs
the same code on CPU in seconds with shrunk configs (tests/test_gpu_bench.py does). Figures also go
to ``--json-out``. The benchmark imports nothing of the retrieval or web stack (no faiss, bm25s,
gradio, fastapi), so a bare GPU box with torch + transformers + peft runs it.

Run on a GPU (about 6 minutes on an H200, compiles included):
    PYTHONPATH=$PWD python -m benchmarks.gpu --json-out gpu.json --budget-s 380
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import percentile

CONFIGS = Path(__file__).resolve().parent / "gpu_configs"
TOKENIZER = CONFIGS / "smollm2-tokenizer"
SHAPES = {"135m": "smollm2-135m.json", "1.5b": "qwen2.5-1.5b.json", "8b": "llama-3-8b.json"}
PROMPT_TOKENS = 300
FILLER = (
    "Customer question: my parcel has not arrived yet and the tracking page shows no update since "
    "Tuesday; I ordered a lamp, two cushions and a gift card. FAQ entry: Standard shipping takes 3-7 "
    "business days, express shipping costs $14.95 and takes 1-2 days. Returns start from Account > "
    "Orders within 30 days. "
)


class Report:
    """Prints each figure with the time since start, keeps all of them for the JSON."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.figures: dict[str, Any] = {}
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {text}", flush=True)

    def put(self, section: str, key: str, value: Any, label: str = "") -> None:
        self.figures.setdefault(section, {})[key] = value
        shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
        self.say(f"{section:>14} | {label or key}: {shown}")

    def time_left(self) -> float:
        return self.budget_s - self.elapsed()


# -- models ------------------------------------------------------------------------------------------


def shape_config(name: str, tiny: bool) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(CONFIGS / SHAPES[name]))
    if tiny:  # the same architecture, shrunk; the SmolLM2 vocabulary so the tokenizer fits
        heads, kv = 4, 2
        config.update(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "head_dim": 16,
                "vocab_size": 49152,
            }
        )
        if hasattr(config, "layer_types") and config.layer_types:
            config.layer_types = config.layer_types[:2]
    return config


def build_model(config: Any, device: Any, dtype: Any) -> Any:
    """A random-initialised causal LM of ``config``'s shape, built on the device (no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bandwidth_bytes_s(device: Any, tiny: bool) -> float:
    """Memory bandwidth from a device-to-device copy (bytes read + written per second)."""
    import torch

    n = (64 if tiny else 2048) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    runs = 5
    start = time.perf_counter()
    for _ in range(runs):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - start
    del src, dst
    return 2 * n * runs / seconds


def sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def free(device: Any) -> None:
    import torch

    gc.collect()
    if getattr(device, "type", str(device)) == "cuda":
        torch._dynamo.reset()  # drop compiled graphs (and their CUDA-graph memory pools) of the last shape
        torch.cuda.empty_cache()


# -- prompts -----------------------------------------------------------------------------------------


def user_messages(tokenizer: Any, user: int, prompt_tokens: int) -> list[dict[str, str]]:
    """A chat whose rendered prompt is about ``prompt_tokens`` long, different for every user."""
    from chatbot.models import chat_token_ids

    words = (f"Order {1000 + user}. " + FILLER * 12).split(" ")
    words = words[user % 7 :]
    system = {"role": "system", "content": "You are the support assistant of an online store."}
    lo, hi = 1, len(words)
    while lo < hi:  # the most words that keep the rendered prompt within prompt_tokens
        mid = (lo + hi + 1) // 2
        msgs = [system, {"role": "user", "content": " ".join(words[:mid])}]
        if len(chat_token_ids(tokenizer, msgs)) <= prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    return [system, {"role": "user", "content": " ".join(words[:lo])}]


# -- raw transformers baselines ---------------------------------------------------------------------


def raw_generate(model: Any, prompts: list[list[int]], new_tokens: int, *, static: bool) -> dict[str, float]:
    """One batched ``generate`` (same-length prompts); decode-only and end-to-end tok/s.

    ``static``: ``cache_implementation="static"``, which transformers compiles (CUDA graphs) on CUDA.
    The first static call compiles and is not timed."""
    import torch
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        """Notes the time of every step (generate syncs with the host at each step anyway)."""

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            stamps.append(time.perf_counter())
            return scores

    device = next(model.parameters()).device
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        do_sample=False,
        repetition_penalty=1.1,  # as the product's default settings
        pad_token_id=0,
        eos_token_id=None,
        cache_implementation="static" if static else None,
    )

    def once() -> float:
        stamps.clear()
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=config,
                logits_processor=LogitsProcessorList([Stamp()]),
            )
        sync(device)
        return time.perf_counter() - start

    warm = 0.0
    if static:
        warm = once()
    wall = once()
    batch = len(prompts)
    decode_s = stamps[-1] - stamps[0] if len(stamps) > 1 else wall
    return {
        "decode_tok_s": batch * (len(stamps) - 1) / decode_s if len(stamps) > 1 else batch * new_tokens / wall,
        "end_to_end_tok_s": batch * new_tokens / wall,
        "warmup_s": warm,
    }


# -- the product path --------------------------------------------------------------------------------


def product_generator(loaded: Any, slots: int, data_dir: Path, window: int) -> Any:
    """``LocalGenerator`` with batching on (``slots`` rows), as the server builds it, warmed up."""
    from chatbot.generation import LocalGenerator
    from chatbot.settings import load_settings

    settings = load_settings(env={}, overrides={"data_dir": str(data_dir)})
    model_settings = dataclasses.replace(
        settings.model, batching="on", compile="auto", context_window=window, max_new_tokens=128
    )
    generator = LocalGenerator(model_settings, data_dir, loaded=loaded, slots=slots)
    assert generator.scheduler is not None
    generator.scheduler.ready.wait()
    return generator


def run_users(
    generator: Any, tokenizer: Any, users: int, *, rounds: int, lengths: list[int], stagger_s: float
) -> dict[str, Any]:
    """``users`` customers, each asking ``rounds`` questions in a row (staggered starts, answer
    lengths cycling through ``lengths``); aggregate tok/s over the whole run and TTFT per answer."""
    messages = [user_messages(tokenizer, u, PROMPT_TOKENS) for u in range(users)]
    ttft: list[float] = []
    decode_rates: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def customer(u: int) -> None:
        time.sleep(stagger_s * u)
        for r in range(rounds):
            n = lengths[(u + r) % len(lengths)]
            start = time.perf_counter()
            first = last = None
            chunks = 0
            try:
                for _ in generator.stream(messages[u], max_new_tokens=n):
                    last = time.perf_counter()
                    first = first or last
                    chunks += 1
            except BaseException as exc:
                failures.append(exc)
                return
            with lock:
                if first is not None:
                    ttft.append(first - start)
                if first is not None and last is not None and chunks > 8 and last > first:
                    decode_rates.append((chunks - 1) / (last - first))

    before = generator.scheduler.stats()["tokens"]
    threads = [threading.Thread(target=customer, args=(u,)) for u in range(users)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise failures[0]
    tokens = generator.scheduler.stats()["tokens"] - before
    return {
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        # One user: the decode rate after the first token (the raw baselines' decode figure).
        "decode_tok_s": (tokens - 1) / (wall - ttft[0]) if users == 1 and ttft and wall > ttft[0] else math.nan,
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p95_ms": 1000 * percentile(ttft, 95),
        # Text chunks, not tokens: a chunk is held back while it ends in a split character.
        "per_user_decode_chunks_s": percentile(decode_rates, 50) if decode_rates else math.nan,
    }


# -- sections ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    tiny: bool
    device: Any
    dtype: Any
    data_dir: Path
    tokenizer: Any
    window: int = 512
    new_tokens: int = 128  # answer length for the raw baselines and the longest product answers
    eager_tokens: int = 24  # eager generate is slow on a GPU (launch-bound): fewer tokens


def load_section(
    report: Report, plan: Plan, shape: str, users: int, *, raw_static: bool, cached: dict[str, Any]
) -> None:
    """Product vs raw for ``users`` concurrent users on ``shape``."""
    from chatbot.models import LoadedModel, chat_token_ids

    section = f"{shape} x{users}"
    model = cached.get(shape)
    if model is None:
        cached.clear()
        free(plan.device)
        model = build_model(shape_config(shape, plan.tiny), plan.device, plan.dtype)
        cached[shape] = model
        size = weight_bytes(model)
        report.put(shape, "weight_gib", size / 2**30, "weights (GiB)")
        bw = report.figures.get("device", {}).get("bandwidth_gb_s")
        if bw:
            report.put(shape, "limit_1user_tok_s", bw * 1e9 / size, "memory-bound limit, 1 user (tok/s)")
    limit_1 = report.figures.get(shape, {}).get("limit_1user_tok_s")
    loaded = LoadedModel(model=model, tokenizer=plan.tokenizer, device=plan.device, dtype=plan.dtype, name=shape)
    prompts = [chat_token_ids(plan.tokenizer, user_messages(plan.tokenizer, u, PROMPT_TOKENS)) for u in range(users)]
    width = min(len(p) for p in prompts)
    prompts = [p[-width:] for p in prompts]  # same length: raw generate without padding

    # 1. the product
    generator = product_generator(loaded, users, plan.data_dir, plan.window)
    stats = generator.scheduler.stats()
    report.put(section, "product_step", stats["step_mode"], "product decode step")
    report.put(section, "product_warmup_s", stats["warmup_s"], "product warm-up (s, at start, before serving)")
    rounds = 3  # per user, back to back: joins and leaves all through the run
    lengths = [plan.new_tokens] if users == 1 else [plan.new_tokens, plan.new_tokens // 2, 3 * plan.new_tokens // 4]
    if users == 1:  # one customer asks a few questions in a row
        runs = [run_users(generator, plan.tokenizer, 1, rounds=1, lengths=lengths, stagger_s=0) for _ in range(3)]
        product = dict(runs[-1])
        product["ttft_p50_ms"] = percentile([r["ttft_p50_ms"] for r in runs], 50)
        product["ttft_p95_ms"] = max(r["ttft_p95_ms"] for r in runs)
        product["aggregate_tok_s"] = percentile([r["decode_tok_s"] for r in runs], 50)
    else:
        # Arrivals spread over about a quarter of one answer's time at the raw batch speed.
        stagger = 0.002 if plan.tiny else 0.01
        product = run_users(generator, plan.tokenizer, users, rounds=rounds, lengths=lengths, stagger_s=stagger)
    steps = generator.scheduler.stats()
    generator.close()
    what = "decode tok/s after the first token" if users == 1 else "aggregate tok/s (incl. joiners' prefills)"
    report.put(section, "product_tok_s", product["aggregate_tok_s"], f"PRODUCT {what}")
    report.put(section, "product_ttft_p50_ms", product["ttft_p50_ms"], "PRODUCT TTFT p50 (ms, 300-token prompt)")
    report.put(section, "product_ttft_p95_ms", product["ttft_p95_ms"], "PRODUCT TTFT p95 (ms)")
    report.put(section, "product_rebases", steps["rebases"], "product time-axis rebases")
    if limit_1:
        report.put(section, "limit_tok_s", limit_1 * users, "memory-bound limit at this batch (tok/s, weights only)")
    del generator
    free(plan.device)

    # 2. raw eager generate, same batch
    eager = raw_generate(model, prompts, plan.eager_tokens if not plan.tiny else 16, static=False)
    report.put(section, "raw_eager_tok_s", eager["decode_tok_s"], "raw eager generate, decode tok/s")
    report.put(section, "product_vs_eager", product["aggregate_tok_s"] / eager["decode_tok_s"], "product / raw eager")

    # 3. raw static-cache generate (compiled on CUDA), same batch
    if raw_static:
        if report.time_left() < (30 if plan.tiny else 90):
            report.say(f"{section}: raw static-compiled generate skipped (budget)")
        else:
            static = raw_generate(model, prompts, plan.new_tokens, static=True)
            label = "compiled" if plan.device.type == "cuda" else "static cache, eager on CPU"
            report.put(section, "raw_static_warmup_s", static["warmup_s"], f"raw static generate warm-up (s, {label})")
            report.put(
                section, "raw_static_tok_s", static["decode_tok_s"], f"raw static generate decode tok/s ({label})"
            )
            report.put(
                section, "raw_static_end_to_end_tok_s", static["end_to_end_tok_s"], "raw static generate incl. prefill"
            )
            # 1 user: decode against decode; many users: the product's figure includes the joiners'
            # prefills, so against the raw batch's end-to-end rate (it prefills too).
            base = static["decode_tok_s"] if users == 1 else static["end_to_end_tok_s"]
            report.put(section, "product_vs_raw_static", product["aggregate_tok_s"] / base, "product / raw static")
            free(plan.device)


def finetune_section(report: Report, plan: Plan, cached: dict[str, Any]) -> None:
    cached.clear()  # the serving model's memory goes back before training starts
    free(plan.device)
    try:
        from benchmarks.gpu_finetune import compare_finetune  # type: ignore[import-not-found]
    except Exception as exc:  # written by another change; the serving figures stand alone
        report.say(f"fine-tune comparison: not available ({type(exc).__name__}: {exc})")
        return
    if plan.tiny:
        config = shape_config("135m", tiny=True)
        folder = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
        config.save_pretrained(folder)
        config_path = folder / "config.json"
    else:
        config_path = CONFIGS / SHAPES["1.5b"]
    # Two loops (recipe, plain) of ``seconds`` each plus loading: keep inside what is left.
    seconds = 3.0 if plan.tiny else max(5.0, min(30.0, (report.time_left() - 20) / 4))
    result = compare_finetune(config_path, TOKENIZER, device=plan.device.type, seconds=seconds, tiny=plan.tiny)
    report.figures["finetune"] = result
    width = max((len(str(k)) for k in result), default=0)
    report.say("fine-tune recipe vs plain peft loop (1.5B shape):")
    for key, value in result.items():
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        print(f"    {key!s:<{width}}  {shown}", flush=True)


# -- main --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="shrunk configs on CPU: the same code in seconds")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip remaining sections after this")
    parser.add_argument("--json-out", type=Path, help="write every figure here (JSON)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cpu")
    parser.add_argument(
        "--sections",
        default="1,32,8,8b,finetune",
        help="comma-separated, in run order: 1 / 8 / 32 users on the 1.5B shape, 8b, finetune",
    )
    args = parser.parse_args(argv)

    import torch

    from chatbot.models import quiet_transformers

    quiet_transformers()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.tiny:
        device = torch.device("cpu")
    elif args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device: running the --tiny configuration on CPU", file=sys.stderr)
        args.tiny = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    report = Report(args.budget_s)
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report.put("device", "name", name, "device")
    report.put("device", "versions", f"torch {torch.__version__}, transformers {transformers.__version__}")
    bw = bandwidth_bytes_s(device, args.tiny)
    report.put("device", "bandwidth_gb_s", bw / 1e9, "memory bandwidth (GB/s, measured copy)")
    plan = Plan(
        tiny=args.tiny,
        device=device,
        dtype=dtype,
        data_dir=Path(tempfile.mkdtemp(prefix="gpu-bench-data-")),
        tokenizer=load_tokenizer(),
    )
    if args.tiny:
        plan.new_tokens = 24
    cached: dict[str, Any] = {}
    # Rough cost of each section on an H200 (two compiles for 1 and 32 users), to skip what cannot finish.
    cost = {"1": 100, "32": 100, "8": 55, "8b": 80, "finetune": 60}
    jobs: dict[str, Callable[[], None]] = {
        "1": lambda: load_section(report, plan, "1.5b", 1, raw_static=True, cached=cached),
        "32": lambda: load_section(report, plan, "1.5b", 32, raw_static=True, cached=cached),
        "8": lambda: load_section(report, plan, "1.5b", 8, raw_static=False, cached=cached),
        "8b": lambda: load_section(report, plan, "8b", 1, raw_static=False, cached=cached),
        "finetune": lambda: finetune_section(report, plan, cached),
    }
    for key in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if key not in jobs:
            parser.error(f"unknown section {key!r}; choose from {', '.join(jobs)}")
        need = 1 if args.tiny else cost[key]  # start a section only if its usual cost still fits
        if report.time_left() < need:
            report.say(f"section {key} skipped: {report.time_left():.0f} s of --budget-s left")
            report.skipped.append(key)
            continue
        report.say(f"== section {key}")
        try:
            jobs[key]()
        except Exception as exc:
            logging.getLogger("benchmarks.gpu").exception("section %s failed", key)
            report.figures.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
            free(device)
    if device.type == "cuda":
        report.put("device", "peak_gpu_gib", torch.cuda.max_memory_allocated(device) / 2**30, "peak GPU memory (GiB)")
    report.figures["skipped"] = report.skipped
    report.figures["total_s"] = report.elapsed()
    report.say(f"done in {report.elapsed():.0f} s")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json_out.with_suffix(".tmp")
        tmp.write_text(json.dumps(report.figures, indent=2, default=str))
        tmp.replace(args.json_out)
    return report.figures


if __name__ == "__main__":
    main()
