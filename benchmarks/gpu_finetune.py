"""Fine-tune throughput on a GPU: the product recipe against a plain peft loop, same model, same data.

:func:`compare_finetune` builds a random-initialised model from a transformers config (no download:
``AutoModelForCausalLM.from_config`` straight on the device, bf16 where the GPU supports it, else
fp16, float32 on a CPU: `chatbot.models.resolve_dtype`) and synthetic FAQ examples rendered by
the product's own data pipeline (`finetune.data`: FAQ entries -> pairs -> examples in the default
layout, the retrieval-augmented and the closed-book prompt, tokenized with the chat template). Then,
each for ``seconds`` after a short warm-up, on a fresh copy of the model:

- ``recipe``: `finetune.train.fit` as ``supportbot finetune`` runs it (LoRA from `finetune.lora`,
  length-grouped micro-batches, its chosen loss mode, its precision rules), with one micro-batch of
  ``BATCH`` examples per optimizer step (``--micro-batch-size 8 --grad-accum 1``, the GPU advice in
  docs/finetuning.md: every micro-batch costs a fixed launch overhead);
- ``plain``: the loop most tutorials write: the same LoRA (rank, alpha, dropout, target modules),
  shuffled batches of ``BATCH`` padded to their longest example, ``model(..., labels=...)`` (the
  full-sequence causal-LM loss, logits over the whole vocabulary at every position; labels masked
  to the answers, so both train the same objective), AdamW, bf16 autocast; no host sync per step.

Returned (a flat dict, every figure beside its baseline): real (non-padding) tokens/s and peak
device memory (``torch.cuda.max_memory_allocated``, reset before each variant; None on a CPU) of
both, their ratios, the loss mode the recipe chose, and the run's shape. ``tiny=True`` shrinks the
config to 2 layers of width 64 (same architecture), for a CPU run in seconds.

    python -m benchmarks.gpu_finetune --config benchmarks/gpu_configs/qwen2.5-1.5b.json \\
        --tokenizer benchmarks/gpu_configs/smollm2-tokenizer --seconds 60
    python -m benchmarks.gpu_finetune --config ... --tokenizer ... --tiny      # CPU, seconds

This module imports only torch, transformers, peft and the fine-tune packages (no faiss, bm25s,
gradio or fastapi: the GPU machines need not have them).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["BATCH", "compare_finetune", "synthetic_entries"]

#: Examples per optimizer step in both variants.
BATCH = 8
WARMUP_STEPS = 2
N_ENTRIES = 80
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}

_TOPICS = [
    ("order", "orders"),
    ("refund", "refunds"),
    ("parcel", "deliveries"),
    ("invoice", "billing"),
    ("password", "accounts"),
    ("subscription", "plans"),
    ("gift card", "payments"),
    ("return label", "returns"),
    ("warranty claim", "repairs"),
    ("delivery address", "shipping"),
]
_ACTIONS = ["cancel", "change", "track", "find", "reset", "pause", "renew", "print"]
_STEPS = [
    "Sign in and open Account > {area}.",
    "Select the {thing} you want to {action}.",
    "Click {Action} and confirm in the dialog that opens.",
    "You get an email within {n} minutes once it is done.",
    "If the button is greyed out, the {thing} is already being processed and can no longer be changed.",
    "Our support team can help by chat from 8 am to 8 pm on weekdays.",
    "Business customers find the same option under Company > {area}.",
    "On the mobile app the option sits in the menu at the top right.",
]


def synthetic_entries(n: int = N_ENTRIES, seed: int = 0) -> list[Any]:
    """``n`` FAQ entries in the style of a shop's help centre: a question, two rephrasings and an
    answer of 1 to 6 sentences (so examples vary in length, as real ones do)."""
    from knowledge_base.entry import FAQEntry

    rng = random.Random(seed)
    entries = []
    for i in range(n):
        thing, area = _TOPICS[i % len(_TOPICS)]
        action = _ACTIONS[(i // len(_TOPICS)) % len(_ACTIONS)]
        steps = rng.sample(_STEPS, rng.randint(1, 6))
        answer = " ".join(
            s.format(thing=thing, area=area.title(), action=action, Action=action.title(), n=rng.randint(2, 30))
            for s in steps
        )
        entries.append(
            FAQEntry(
                id=f"faq-{i:03d}",
                question=f"How do I {action} my {thing}?",
                alt_questions=(f"Can I {action} a {thing} online?", f"{action} {thing} not working, what now?"),
                answer=answer,
            )
        )
    return entries


def _examples(tokenizer: Any, settings: Any) -> list[Any]:
    from finetune.data import DataError, build_examples, lexical_retriever, pairs_from_entries, tokenize_examples

    entries = synthetic_entries()
    examples = build_examples(
        pairs_from_entries(entries), layout=settings.layout, retrieve=lexical_retriever(entries, 3), k=3, seed=0
    )
    out = []
    for example in examples:  # one by one: a tokenizer with a small vocabulary makes a few too long
        try:
            out += tokenize_examples([example], tokenizer, settings.max_length)
        except DataError:
            continue
    return out


def _config(config_path: Path, tiny: bool, vocab_size: int) -> Any:
    from transformers import AutoConfig

    config = AutoConfig.for_model(**json.loads(Path(config_path).read_text(encoding="utf-8")))
    if tiny:  # the same architecture, shrunk (a config that is small already stays as it is)
        config.update({k: min(v, getattr(config, k, v) or v) for k, v in TINY_SHAPE.items()})
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: config.num_hidden_layers]
    # Token ids of the tokenizer must exist in the embedding (the 1.5B shape's vocabulary is larger).
    config.vocab_size = max(int(config.vocab_size), vocab_size)
    return config


def _build(config: Any, device: Any, dtype: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: no host copy of the weights
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def _free(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _run_recipe(config: Any, data: list[Any], settings: Any, pad_id: int, device: Any, dtype: Any, seconds: float):
    from finetune.lora import apply_lora
    from finetune.train import fit

    model = apply_lora(_build(config, device, dtype), settings)
    with tempfile.TemporaryDirectory(prefix="gpu-finetune-") as tmp:
        fit(
            model, data, settings, run_dir=Path(tmp) / "warm", pad_id=pad_id, max_steps=WARMUP_STEPS, progress_bar=False
        )
        _free(device)
        start = time.perf_counter()
        result = fit(
            model,
            data,
            settings,
            run_dir=Path(tmp) / "timed",
            pad_id=pad_id,
            max_steps=10**9,
            time_limit_s=seconds,
            progress_bar=False,
        )
        wall = time.perf_counter() - start
    out = {
        "tokens_per_s": result.tokens_per_s,
        "peak_gib": _peak_gib(device),
        "steps": result.steps,
        "loss": result.last_loss,
        "loss_mode": result.loss_mode,
        # choosing the loss mode (agreement check, timing) happens once per run, outside its clock
        "setup_s": wall - result.seconds,
    }
    return out


def _run_plain(config: Any, data: list[Any], settings: Any, pad_id: int, device: Any, dtype: Any, seconds: float):
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.lora import resolve_target_modules
    from finetune.loss import autocast

    base = _build(config, device, dtype)
    base.config.use_cache = False  # as every training script sets it (a cache is built otherwise)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_target_modules(base, settings.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)
    rng = random.Random(0)
    order: list[int] = []
    real = padded = 0

    def step() -> int:
        nonlocal real, padded
        if len(order) < BATCH:
            order.extend(rng.sample(range(len(data)), len(data)))
        chunk = [data[order.pop()] for _ in range(BATCH)]
        width = max(len(ex) for ex in chunk)
        ids = torch.full((BATCH, width), pad_id, dtype=torch.long)
        mask = torch.zeros((BATCH, width), dtype=torch.long)
        labels = torch.full((BATCH, width), -100, dtype=torch.long)
        for row, ex in enumerate(chunk):
            ids[row, : len(ex)] = torch.tensor(ex.input_ids)
            mask[row, : len(ex)] = 1
            labels[row, ex.prompt_len : len(ex)] = ids[row, ex.prompt_len : len(ex)]
        with autocast(device, dtype):
            loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens = sum(len(ex) for ex in chunk)
        real, padded = real + tokens, padded + BATCH * width
        return tokens

    for _ in range(WARMUP_STEPS):
        step()
    _free(device)
    real = padded = 0
    steps = tokens = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        tokens += step()
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the clock stops when the queued steps are done
    wall = time.perf_counter() - start
    out = {
        "tokens_per_s": tokens / wall,
        "peak_gib": _peak_gib(device),
        "steps": steps,
        "padding": 1 - real / max(padded, 1),
    }
    return out


def compare_finetune(config_path: Path, tokenizer_dir: Path, *, device: str, seconds: float, tiny: bool) -> dict:
    """The recipe against the plain peft loop on ``config_path``'s architecture (see the module doc).

    Keys: ``recipe_tok_s`` / ``plain_tok_s`` (real tokens per second), ``speedup`` (their ratio),
    ``recipe_peak_gib`` / ``plain_peak_gib`` and ``memory_ratio`` (None on a CPU), ``loss_mode``,
    ``recipe_steps`` / ``plain_steps``, ``plain_padding`` (share of padding in the plain batches),
    ``recipe_setup_s`` (the once-per-run loss-mode check, outside the recipe's clock), and the run's
    shape: ``device``, ``dtype``, ``model_type``, ``params_m``, ``batch``, ``micro_batch_size``,
    ``grad_accum_steps``, ``examples``, ``mean_tokens``, ``max_length``, ``seconds``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbot.models import quiet_transformers, resolve_dtype
    from chatbot.settings import FinetuneSettings

    quiet_transformers()
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype("auto", dev)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = int(tokenizer.pad_token_id)
    # The product's defaults (rank 16, alpha 32, dropout 0.05, attention projections, both layouts,
    # 384 tokens), one micro-batch of BATCH a step, no checkpoints inside the measurement.
    settings = FinetuneSettings(micro_batch_size=BATCH, grad_accum_steps=1, checkpoint_every=0, seed=0)
    data = _examples(tokenizer, settings)
    config = _config(config_path, tiny, len(tokenizer))
    with torch.device("meta"):  # shapes only
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())

    _free(dev)
    plain = _run_plain(config, data, settings, pad_id, dev, dtype, seconds)
    _free(dev)  # the plain model is gone with its function's frame
    recipe = _run_recipe(config, data, settings, pad_id, dev, dtype, seconds)
    _free(dev)
    ratio = recipe["peak_gib"] / plain["peak_gib"] if recipe["peak_gib"] and plain["peak_gib"] else None
    return {
        "recipe_tok_s": recipe["tokens_per_s"],
        "plain_tok_s": plain["tokens_per_s"],
        "speedup": recipe["tokens_per_s"] / plain["tokens_per_s"] if plain["tokens_per_s"] else math.nan,
        "recipe_peak_gib": recipe["peak_gib"],
        "plain_peak_gib": plain["peak_gib"],
        "memory_ratio": ratio,
        "loss_mode": recipe["loss_mode"],
        "recipe_steps": recipe["steps"],
        "plain_steps": plain["steps"],
        "plain_padding": plain["padding"],
        "recipe_setup_s": recipe["setup_s"],
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "model_type": config.model_type,
        "params_m": params / 1e6,
        "batch": BATCH,
        "micro_batch_size": settings.micro_batch_size,
        "grad_accum_steps": settings.grad_accum_steps,
        "examples": len(data),
        "mean_tokens": sum(len(ex) for ex in data) / len(data),
        "max_length": settings.max_length,
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="a transformers config.json (random weights)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer folder with a chat template")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cuda, cpu")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time per variant")
    parser.add_argument("--tiny", action="store_true", help="2 layers of width 64, for a CPU run in seconds")
    parser.add_argument("--json-out", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)

    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    result = compare_finetune(args.config, args.tokenizer, device=device, seconds=args.seconds, tiny=args.tiny)
    width = max(len(k) for k in result)
    print("fine-tune: the recipe against a plain peft loop")
    for key, value in result.items():
        print(f"  {key:<{width}}  {value:,.3f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
