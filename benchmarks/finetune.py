"""Fine-tuning benchmark: our LoRA recipe against a plain peft + transformers loop, and quality gains.

Part 1, throughput (same data, same run). Each variant runs in its own subprocess (so each peak RSS
is its own) and the two are driven in lock-step, one optimizer step each in turn, so that the other
jobs on a shared machine slow both alike:

- ``plain``: the loop most tutorials write: batches of 8 padded to 256 tokens, ``model(...,
  labels=...)`` (float32 logits over the whole 49k vocabulary for every position), AdamW;
- ``recipe``: ``finetune.train.fit`` at the default settings (micro-batches of 4 x 2 accumulation
  steps, length-grouped dynamic padding, output head on answer positions only, the shared system
  prompt computed once per micro-batch).

Both train LoRA r=16 on q/k/v/o of SmolLM2-135M-Instruct on the same examples (the demo FAQ's
closed-book examples, all <= 256 tokens), 8 examples per optimizer step. Reported: real
(non-padding) tokens/s and seconds per step after a warm-up step, peak RSS, and the share of the
CPUs other processes used meanwhile (timings on 2 shared cores are only as good as that figure).

Part 2, quality: on the demo knowledge base (opened with the project's hybrid retriever, as
served), train on every phrasing of the FAQ entries in the retrieval-augmented layout for a short
run (at most ``--minutes``), then evaluate the base model and the adapter on held-out customer
paraphrases from ``queries.jsonl`` (their reference answer is their entry's answer): loss, ROUGE-L,
token F1 and MiniLM cosine in the rag and closed-book layouts, and refusals on ``out_of_scope.jsonl``
questions. The FAQ entries whose phrasings were held out of training (``--eval-fraction``) are
scored apart.

Part 3, resume: the same short run straight and with a Ctrl-C half-way plus ``resume=True``; the
final losses must agree within 1%.

    python -m benchmarks.finetune --threads 1      # all parts (about an hour on 2 busy CPU cores)
    python -m benchmarks.finetune --quick          # 3 throughput steps, 12 training steps, fewer answers
    python -m benchmarks.finetune --part throughput

Reports go to ``benchmarks/results/finetune/`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "finetune"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


# --------------------------------------------------------------------------------------------------
# Part 1: throughput, one variant per subprocess


def _examples(model_dir: str, n: int, max_length: int) -> tuple[Any, list[Any]]:
    from transformers import AutoTokenizer

    from chatbot.services import demo_file
    from finetune.data import build_examples, pairs_from_entries, tokenize_examples
    from knowledge_base.loaders import load_faq_file
    from knowledge_base.settings import KBSettings

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    entries = load_faq_file(demo_file("faq.csv"), KBSettings()).entries
    examples = build_examples(pairs_from_entries(entries), layout="closed", seed=0)
    tokenized = [t for t in tokenize_examples(examples, tokenizer, 4096) if len(t) <= max_length]
    # A fixed, seeded choice of n examples: the same for both variants.
    import random

    random.Random(0).shuffle(tokenized)
    if not tokenized:
        raise SystemExit(f"no closed-book demo example fits {max_length} tokens with the tokenizer of {model_dir}")
    if len(tokenized) < n:
        tokenized = (tokenized * (n // len(tokenized) + 1))[:n]
    return tokenizer, tokenized[:n]


def worker(variant: str, model_dir: str, steps: int, threads: int = 0) -> None:
    """One variant in its own process, driven step by step over stdin/stdout by :func:`throughput`.

    Prints ``ready``, then waits for a line before each optimizer step and answers with one JSON
    line (step seconds, real tokens) after it; ends with its peak RSS.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from chatbot.models import quiet_transformers
    from chatbot.settings import FinetuneSettings

    quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    batch, width = 8, 256
    tokenizer, data = _examples(model_dir, steps * batch, width)
    pad = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The recipe at its defaults (micro-batches of 4 x 2 accumulation steps), LoRA as in the issue.
    settings = FinetuneSettings(rank=16, alpha=32, target_modules="q_proj,k_proj,v_proj,o_proj", seed=0)

    def report(**fields: Any) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    def wait() -> float:
        if not sys.stdin.readline():
            raise SystemExit(0)
        return time.perf_counter()

    if variant == "plain":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        config = LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
        )
        peft_model = get_peft_model(model, config)
        peft_model.train()
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-4)
        report(event="ready")
        for step in range(steps):
            t0 = wait()
            chunk = data[step * batch : (step + 1) * batch]
            ids = torch.full((batch, width), pad, dtype=torch.long)
            mask = torch.zeros((batch, width), dtype=torch.long)
            labels = torch.full((batch, width), -100, dtype=torch.long)
            for row, ex in enumerate(chunk):
                ids[row, : len(ex)] = torch.tensor(ex.input_ids)
                mask[row, : len(ex)] = 1
                labels[row, ex.prompt_len : len(ex)] = ids[row, ex.prompt_len : len(ex)]
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            report(event="step", seconds=time.perf_counter() - t0, tokens=int(mask.sum()), loss=loss.detach().item())
    else:
        import tempfile

        from finetune.lora import apply_lora
        from finetune.train import fit

        torch.manual_seed(0)
        lora_model = apply_lora(model, settings)
        state = {"t0": 0.0, "tokens": 0}

        def progress(info: dict[str, Any]) -> None:
            report(
                event="step",
                seconds=time.perf_counter() - state["t0"],
                tokens=info["tokens"] - state["tokens"],
                loss=info["loss"],
            )
            state["tokens"] = info["tokens"]
            if info["step"] < steps:
                state["t0"] = wait()

        report(event="ready")
        state["t0"] = wait()
        with tempfile.TemporaryDirectory() as run_dir:
            result = fit(
                lora_model,
                data,
                settings,
                run_dir=Path(run_dir),
                pad_id=pad,
                max_steps=steps,
                on_progress=progress,
                progress_bar=False,
            )
        assert result.tokens == sum(len(ex) for ex in data)  # the same examples, each once
    report(event="done", peak_rss_gb=_peak_rss_gb(), threads=torch.get_num_threads())


def throughput(model_dir: str, steps: int, threads: int = 0) -> dict[str, Any]:
    """Run both variants in lock-step: plain step 1, recipe step 1, plain step 2... so that a busy
    neighbour on the shared CPUs slows both alike; each process keeps its own peak RSS."""
    from benchmarks.common import busy_cpu_seconds, process_cpu_seconds

    variants = ("plain", "recipe")
    procs = {
        v: subprocess.Popen(
            [sys.executable, __file__, "_worker", v, model_dir, str(steps), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        for v in variants
    }

    def receive(v: str) -> dict[str, Any]:
        stdout = procs[v].stdout
        assert stdout is not None
        while True:
            line = stdout.readline()
            if not line:
                raise RuntimeError(f"the {v} worker ended early (exit code {procs[v].wait()})")
            if line.startswith("{"):
                return dict(json.loads(line))

    for v in variants:
        assert receive(v)["event"] == "ready"
    cores = os.cpu_count() or 1
    records: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    print(f"\n== throughput: {steps} steps of 8 examples per variant, interleaved ==", flush=True)
    for step in range(steps):
        for v in variants:
            busy0, own0, start = busy_cpu_seconds(), process_cpu_seconds(procs[v].pid), time.perf_counter()
            stdin = procs[v].stdin
            assert stdin is not None
            stdin.write("go\n")
            stdin.flush()
            record = receive(v)
            busy, own = busy_cpu_seconds() - busy0, process_cpu_seconds(procs[v].pid) - own0
            record["foreign_cpu_share"] = max(0.0, busy - own) / max((time.perf_counter() - start) * cores, 1e-9)
            records[v].append(record)
            print(
                f"{v:<6} step {step + 1}/{steps}: {record['seconds']:6.1f} s, {record['tokens']} real tokens, "
                f"loss {record['loss']:.3f}, other processes {record['foreign_cpu_share']:.0%} of the CPUs",
                flush=True,
            )
    results: dict[str, Any] = {}
    for v in variants:
        done = receive(v)
        procs[v].wait()
        steady = records[v][1:] or records[v]  # the first step warms up allocators and caches
        seconds = sum(r["seconds"] for r in steady)
        results[v] = {
            "seconds_per_step": seconds / len(steady),
            "real_tokens_per_s": sum(r["tokens"] for r in steady) / seconds,
            "real_tokens": sum(r["tokens"] for r in records[v]),
            "peak_rss_gb": done["peak_rss_gb"],
            "threads": done["threads"],
            "foreign_cpu_share": sum(r["foreign_cpu_share"] for r in steady) / len(steady),
            "steps": records[v],
        }
    plain, recipe = results["plain"], results["recipe"]
    ratio = recipe["real_tokens_per_s"] / plain["real_tokens_per_s"]
    summary = {
        **results,
        "speedup_real_tokens_per_s": ratio,
        "padding_share_plain": 1 - plain["real_tokens"] / (steps * 8 * 256),
    }
    print("\n== throughput (SmolLM2-135M, LoRA r=16 q/k/v/o, float32 CPU, 8 examples per optimizer step) ==")
    print(f"{'':<8} {'s/step':>8} {'real tok/s':>11} {'peak RSS GB':>12} {'other procs':>12}")
    for name, r in (("plain", plain), ("recipe", recipe)):
        print(
            f"{name:<8} {r['seconds_per_step']:>8.2f} {r['real_tokens_per_s']:>11.1f} "
            f"{r['peak_rss_gb']:>12.2f} {r['foreign_cpu_share']:>11.0%}"
        )
    print(f"padding in the plain batches: {summary['padding_share_plain']:.0%}; torch threads: {plain['threads']}")
    print(f"speed-up in real tokens/s: {ratio:.2f}x (steady state, step 1 excluded)")
    (RESULTS / "throughput.json").write_text(json.dumps(summary, indent=2))
    return summary


# --------------------------------------------------------------------------------------------------
# Part 2: quality before/after on held-out paraphrases


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def quality(args: argparse.Namespace, model_dir: str) -> dict[str, Any]:
    import shutil

    import torch

    from chatbot.models import load_model
    from chatbot.services import demo_file, open_knowledge_base
    from chatbot.settings import load_settings
    from finetune import evaluate as ev
    from finetune.data import (
        REFUSAL,
        QAPair,
        SFTExample,
        build_examples,
        dataset_hash,
        pairs_from_entries,
        prepare_data,
        tokenize_examples,
    )
    from finetune.lora import adapter_metadata, apply_lora, save_adapter
    from finetune.train import fit
    from knowledge_base.embeddings import make_embedder

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = RESULTS / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    settings = load_settings(env={}, overrides={"data_dir": str(data_dir)})
    settings = settings.replace(
        model={"model": model_dir, "device": "cpu"},
        finetune={
            "rank": args.rank,
            "alpha": args.alpha,
            "learning_rate": args.lr,
            "max_length": args.max_length,
            "layout": "rag",
            "checkpoint_every": 0,
            "eval_fraction": args.eval_fraction,
            "micro_batch_size": args.micro_batch_size,
            "grad_accum_steps": args.grad_accum,
            "warmup_ratio": 0.05,
        },
    )
    ft = settings.finetune
    k = settings.policy.max_context_entries
    embedder = make_embedder(settings.kb)
    kb = open_knowledge_base(settings, embedder=embedder)
    kb.add_files([demo_file("faq.csv")])
    entries = kb.entries(enabled_only=True)
    by_id = {e.id: e for e in entries}

    def retrieve(question: str) -> list[Any]:
        return [hit.entry for hit in kb.search(question, k + 2)]

    data = prepare_data(
        pairs_from_entries(entries),
        layout="rag",
        eval_fraction=ft.eval_fraction,
        seed=ft.seed,
        retrieve=retrieve,
        k=k,
        refusal_fraction=args.refusal_fraction,
    )
    held_out_entries = {p.group for p in data.eval_pairs}

    # Held-out paraphrases (customer wording never trained on) and out-of-scope questions.
    queries = [q for q in _read_jsonl(demo_file("queries.jsonl")) if q.get("faq_id") in by_id]
    if args.split != "all":
        queries = [q for q in queries if q.get("split") == args.split]
    para = [
        QAPair(q["query"], by_id[q["faq_id"]].answer, q["faq_id"], q["query_id"], gold=(by_id[q["faq_id"]],))
        for q in queries
    ]
    hits = sum(any(h.entry.id == p.group for h in kb.search(p.question, k)) for p in para)
    # Generation is the slow part on a CPU: every paraphrase of an entry never trained on, plus a
    # seeded sample of the others (rag); fewer closed-book ones; some out-of-scope questions.
    import random

    rng = random.Random(0)
    unseen_para = [p for p in para if p.group in held_out_entries]
    seen_para = [p for p in para if p.group not in held_out_entries]
    n_rag = args.eval_items or len(para)
    chosen = unseen_para + rng.sample(seen_para, max(0, min(len(seen_para), n_rag - len(unseen_para))))
    eval_examples = build_examples(chosen, layout="rag", retrieve=retrieve, k=k, refusal_fraction=0.0, seed=1)
    closed = rng.sample(chosen, min(len(chosen), args.closed_items or len(chosen)))
    eval_examples += build_examples(closed, layout="closed", refusal_fraction=0.0, seed=1)
    oos = [
        q for q in _read_jsonl(demo_file("out_of_scope.jsonl")) if args.split == "all" or q.get("split") == args.split
    ]
    oos = rng.sample(oos, min(len(oos), args.oos_items or len(oos)))
    for q in oos:
        context = tuple(retrieve(q["query"])[:k])
        eval_examples.append(
            SFTExample(q["query"], REFUSAL, "rag", "oos", q["query_id"], context=context, refusal=True)
        )

    loaded = load_model(settings.model, settings.data_dir, for_training=True)
    tok = loaded.tokenizer
    pad = int(tok.pad_token_id)
    train_tok = tokenize_examples(data.train, tok, ft.max_length)
    eval_tok = tokenize_examples([e for e in eval_examples if not e.refusal], tok, ft.max_length)
    split_tok = tokenize_examples(data.eval, tok, ft.max_length)
    print(
        f"\n== quality: {len(train_tok)} training examples ({data.stats['train_groups']} entries, "
        f"{data.stats['train_refusals']} refusals); evaluated on {len(chosen)} of {len(para)} held-out paraphrases "
        f"({len(unseen_para)} of entries never trained on; {len(closed)} also closed-book), {len(oos)} out-of-scope; "
        f"retrieval hit@{k} of the paraphrases {hits / max(len(para), 1):.0%} ==",
        flush=True,
    )
    answer_kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "max_items": 0,  # the selection above
        "embedder": embedder,
        "repetition_penalty": settings.model.repetition_penalty,
        "batch_size": 8,
    }

    def evaluate(model: Any, label: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = ev.evaluate_model(
            model, tok, eval_examples, eval_tok, pad_id=pad, max_length=ft.max_length, **answer_kwargs
        )
        out["split_loss"] = ev.evaluate_loss(model, split_tok, pad_id=pad).get("loss")
        # The same answers scored apart for the entries held out of training and the others.
        items = [i for i in out.get("rag", {}).get("items", []) if not i["refusal_expected"]]
        for name, subset in (
            ("unseen_entries", [i for i in items if i["group"] in held_out_entries]),
            ("seen_entries", [i for i in items if i["group"] not in held_out_entries]),
        ):
            if subset:
                out[name] = {
                    "n": len(subset),
                    "rouge_l": sum(i["rouge_l"] for i in subset) / len(subset),
                    "token_f1": sum(i["token_f1"] for i in subset) / len(subset),
                }
        out["seconds"] = time.perf_counter() - t0
        print(f"{label}: evaluated in {out['seconds']:.0f} s", flush=True)
        return out

    before = evaluate(loaded.model, "base model")
    torch.manual_seed(ft.seed)
    model = apply_lora(loaded.model, ft)

    def show(info: dict[str, Any]) -> None:
        if info["step"] % 5 == 0 or info["step"] == info["total_steps"]:
            print(
                f"step {info['step']}/{info['total_steps']} loss {info['loss']:.3f} "
                f"{info['tokens_per_s']:.0f} real tok/s, {info['elapsed_s']:.0f} s",
                flush=True,
            )

    run_dir = RESULTS / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    result = fit(
        model,
        train_tok,
        ft,
        run_dir=run_dir,
        pad_id=pad,
        max_steps=args.train_steps,
        fingerprint=dataset_hash(train_tok),
        on_progress=show,
        progress_bar=False,
        time_limit_s=args.minutes * 60,  # the budget: stop after the step that reaches it
    )
    training = result.to_dict()
    train_s = time.perf_counter() - t0
    after = evaluate(model, "adapter")
    metadata = adapter_metadata(
        base_model=settings.model.model,
        base_model_path=model_dir,
        dataset_hash=dataset_hash(train_tok),
        settings=ft,
        metrics={"rag_rouge_l": after.get("rag", {}).get("rouge_l")},
    )
    save_adapter(model, RESULTS / "adapter", metadata)
    report = {
        "adapter": "benchmark (demo KB, held-out paraphrases)",
        "base_model": "SmolLM2-135M-Instruct",
        "created_at": metadata["created_at"],
        "dataset_hash": metadata["dataset_hash"],
        "data": {**data.stats, "eval_examples": len(eval_examples), "eval_groups": len({p.group for p in chosen})},
        "training": {**training, "wall_s": train_s},
        "before": before,
        "after": after,
        "retrieval_hit_rate": hits / max(len(para), 1),
    }
    paths = ev.write_report(report, RESULTS, stem="quality")
    print("\n== quality before -> after (held-out paraphrases; rag = gold entry among the 3 shown) ==")
    for label, b, a in ev.summary_rows(before, after):
        print(f"{label:<48} {'-' if b is None else f'{b:.3f}':>8} -> {'-' if a is None else f'{a:.3f}':>8}")
    for key, label in (("seen_entries", "entries trained on"), ("unseen_entries", "entries never trained on")):
        b, a = before.get(key, {}), after.get(key, {})
        if a:
            title = f"RAG ROUGE-L, {label} (n={a['n']})"
            print(f"{title:<48} {b.get('rouge_l', 0):>8.3f} -> {a['rouge_l']:>8.3f}")
    print(f"{'loss on held-out FAQ phrasings (split)':<48} {before['split_loss']:>8.3f} -> {after['split_loss']:>8.3f}")
    print(
        f"training: {result.steps} steps ({result.steps * ft.micro_batch_size * ft.grad_accum_steps} examples) in "
        f"{result.seconds:.0f} s ({result.seconds / 60:.1f} min)"
        f"{', stopped by the time budget' if result.stopped_early else ''}, "
        f"{result.tokens_per_s:.0f} real tokens/s, loss mode {result.loss_mode}, "
        f"peak RSS after training {result.peak_rss_mb / 1024:.2f} GB (whole run {_peak_rss_gb():.2f} GB)"
    )
    print(f"report: {paths['markdown']}")
    return report


# --------------------------------------------------------------------------------------------------
# Part 3: resume after an interruption reaches the same loss


def resume_check(model_dir: str, steps: int, threads: int = 0) -> dict[str, Any]:
    """Train ``steps`` optimizer steps straight, then again with a Ctrl-C after half of them and
    ``resume=True``; the same seed, data and settings (dropout on, 2 accumulated micro-batches, so
    the RNG and data position must both be restored). Reports both final losses and their gap."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatbot.models import quiet_transformers
    from chatbot.settings import FinetuneSettings
    from finetune.lora import apply_lora
    from finetune.train import TrainingInterrupted, fit

    if threads:
        torch.set_num_threads(threads)
    tokenizer, data = _examples(model_dir, 8 * steps, 256)
    ft = FinetuneSettings(micro_batch_size=4, grad_accum_steps=2, dropout=0.05, learning_rate=1e-3, seed=0)
    pad = tokenizer.pad_token_id

    def run(run_dir: Path, **kwargs: Any) -> Any:
        quiet_transformers()
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(ft.seed)
        model = apply_lora(base, ft)
        return fit(model, data, ft, run_dir=run_dir, pad_id=pad, max_steps=steps, progress_bar=False, **kwargs)

    def stop_half_way(info: dict[str, Any]) -> None:
        if info["step"] == steps // 2:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run

    root = RESULTS / "resume"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    straight = run(root / "straight")
    try:
        run(root / "resumed", on_progress=stop_half_way)
        raise SystemExit("the interruption did not happen")
    except TrainingInterrupted as exc:
        interrupted_at = exc.step
    resumed = run(root / "resumed", resume=True)
    gap = abs(resumed.final_loss - straight.final_loss) / straight.final_loss
    out = {
        "steps": steps,
        "interrupted_at": interrupted_at,
        "resumed_from": resumed.resumed_from,
        "final_loss_straight": straight.final_loss,
        "final_loss_resumed": resumed.final_loss,
        "relative_gap": gap,
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"resume: {steps} steps straight -> final loss {straight.final_loss:.4f}; interrupted at step "
        f"{interrupted_at}, resumed from {resumed.resumed_from} -> {resumed.final_loss:.4f} "
        f"(gap {100 * gap:.3f}%, target <= 1%: {'PASS' if gap <= 0.01 else 'MISS'})",
        flush=True,
    )
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["throughput", "quality", "resume", "all"], default="all")
    parser.add_argument("--resume-steps", type=int, default=4, help="optimizer steps of the resume check")
    parser.add_argument("--quick", action="store_true", help="fewer steps and eval items")
    parser.add_argument("--model-cache", type=Path, default=ROOT / "supportbot-data", help="data dir holding models/")
    parser.add_argument("--model", help="another model folder instead of the bundled SmolLM2 (for trying the script)")
    parser.add_argument("--throughput-steps", type=int, default=6)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process (0: torch's default; 1 is steadier when shared)",
    )
    parser.add_argument("--train-steps", type=int, default=30, help="optimizer steps of the quality run")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget of the quality run")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--micro-batch-size", type=int, default=2, help="2 x 2: ~3 GB with 500-token examples")
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=640)
    parser.add_argument("--eval-fraction", type=float, default=0.15)
    parser.add_argument("--refusal-fraction", type=float, default=0.2)
    parser.add_argument(
        "--eval-items", type=int, default=48, help="paraphrases answered in the rag layout (0: all of the split)"
    )
    parser.add_argument("--closed-items", type=int, default=24, help="of those, answered closed-book too (0: all)")
    parser.add_argument("--oos-items", type=int, default=12, help="out-of-scope questions (0: all of the split)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--split", choices=["dev", "test", "all"], default="test", help="queries.jsonl split")
    args = parser.parse_args()
    if args.quick:
        args.throughput_steps = min(args.throughput_steps, 3)
        args.train_steps = min(args.train_steps, 12)
        args.eval_items, args.closed_items, args.oos_items = 24, 12, 6

    from chatbot.models import resolve_model_path
    from chatbot.settings import ModelSettings

    RESULTS.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or str(Path(resolve_model_path(ModelSettings(), args.model_cache)).resolve())
    summary: dict[str, Any] = {"args": vars(args) | {"model_cache": str(args.model_cache)}}
    if args.part in ("throughput", "all"):
        summary["throughput"] = throughput(model_dir, args.throughput_steps, args.threads)
    if args.part in ("quality", "all"):
        report = quality(args, model_dir)
        summary["quality"] = {
            "before": {k: v for k, v in report["before"].items() if k != "samples"},
            "after": {k: v for k, v in report["after"].items() if k != "samples"},
            "training": {k: v for k, v in report["training"].items() if k not in ("losses", "eval_losses")},
        }
    if args.part in ("resume", "all"):
        summary["resume"] = resume_check(model_dir, args.resume_steps, args.threads)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nall figures: {RESULTS / 'summary.json'}")


if __name__ == "__main__":
    main()
