"""Before/after evaluation of a fine-tune on held-out data, and the report (JSON, Markdown, PNG).

Measured on the eval split (whole FAQ entries the model never trained on) or any examples given:

- **loss / perplexity** over the answer tokens, the quantity training lowers;
- **answer quality** of greedy answers against the reference answers, in both layouts:
  ``rag`` (the FAQ entries, gold entry included, then the question: the engine's ``generated`` mode)
  and ``closed`` (the question alone: what the model knows by itself):

  - ROUGE-L: F-measure of the longest common subsequence of words (implemented here, no extra
    dependency; the same definition as the ``rouge-score`` package without stemming);
  - token F1: overlap of the bags of words (SQuAD style: case, punctuation and articles ignored);
  - embedding cosine: similarity of prediction and reference with the knowledge base's embedder
    (MiniLM by default; injectable, the tests pass a fake);
  - in ``rag``, the share of refusals (``I don't know.``) where the entries do not answer the question,
    and of wrong refusals where they do, both by the engine's own test (`chatbot.grounding.is_refusal`):
    what counts is what the engine would hand off.

Answers are generated in batches with left padding (a decoder-only model continues from the right
end of each row; PITFALLS #12) and the serving settings' repetition penalty.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatbot.grounding import is_refusal
from finetune.data import SFTExample, TokenizedExample, end_of_turn_ids, tokenize_examples
from finetune.train import answer_loss, collate
from knowledge_base.atomic import atomic_write_text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from knowledge_base.embeddings import Embedder

__all__ = [
    "answer_metrics",
    "evaluate_answers",
    "evaluate_loss",
    "evaluate_model",
    "generate_answers",
    "is_refusal",
    "plot_loss_curve",
    "render_markdown",
    "rouge_l",
    "summary_rows",
    "token_f1",
    "write_report",
]

_WORD = re.compile(r"\w+")
_ARTICLES = {"a", "an", "the"}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words: 2PR/(P+R) with P = LCS/|prediction|, R = LCS/|reference|."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 (SQuAD style: case, punctuation and a/an/the ignored)."""
    pred = [w for w in _words(prediction) if w not in _ARTICLES]
    ref = [w for w in _words(reference) if w not in _ARTICLES]
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------------
# Model runs


def evaluate_loss(
    model: Any, examples: Sequence[TokenizedExample], *, pad_id: int, batch_size: int = 8
) -> dict[str, float]:
    """Mean loss per answer token over ``examples`` and its perplexity (model left in eval mode)."""
    import torch

    if not examples:
        return {}
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, targets = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start : start + batch_size]], pad_id, device)
            total += answer_loss(model, batch).double()  # read once at the end: no wait per batch
            targets += batch.n_targets
    loss = float(total) / max(targets, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": float(targets)}


def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Greedy answers for prompt token ids, in batches of similar length with left padding."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    stop = list(dict.fromkeys([*end_of_turn_ids(tokenizer), tokenizer.eos_token_id]))
    stop = [t for t in stop if t is not None]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "eos_token_id": stop,
        "pad_token_id": pad,
        "use_cache": True,  # training turned it off in the model's config
    }
    if repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = repetition_penalty
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                n = len(prompts[i])
                ids[r, width - n :] = torch.tensor(list(prompts[i]), dtype=torch.long)
                mask[r, width - n :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            for r, i in enumerate(rows):
                answers[i] = str(tokenizer.decode(out[r, width:], skip_special_tokens=True)).strip()
    return answers


def answer_metrics(
    predictions: Sequence[str], references: Sequence[str], *, embedder: Embedder | None = None
) -> dict[str, float]:
    """Mean ROUGE-L, token F1 and (with an embedder) embedding cosine of predictions vs references."""
    import numpy as np

    n = len(predictions)
    if n == 0:
        return {"n": 0}
    out = {
        "n": n,
        "rouge_l": sum(map(rouge_l, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
    }
    if embedder is not None:
        a = embedder.embed([p or " " for p in predictions])
        b = embedder.embed([r or " " for r in references])
        out["embedding_cosine"] = float(np.mean(np.sum(a * b, axis=1)))
    return out


def _sample(items: list[SFTExample], limit: int, seed: int) -> list[SFTExample]:
    if limit <= 0 or len(items) <= limit:
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def evaluate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[SFTExample],
    *,
    max_length: int,
    max_new_tokens: int = 160,
    max_items: int = 64,
    batch_size: int = 8,
    embedder: Embedder | None = None,
    repetition_penalty: float = 1.0,
    samples: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Answer quality per layout present in ``examples``.

    At most ``max_items`` answerable examples per layout (and a quarter as many refusal examples),
    a seeded sample; 0 takes them all.
    """
    results: dict[str, Any] = {}
    for layout in ("rag", "closed"):
        answerable = _sample([e for e in examples if e.layout == layout and not e.refusal], max_items, seed)
        refusal_limit = max(max_items // 4, 1) if max_items > 0 else 0
        refusals = _sample([e for e in examples if e.layout == layout and e.refusal], refusal_limit, seed)
        if not answerable and not refusals:
            continue
        items = answerable + refusals
        prompts = [t.input_ids[: t.prompt_len] for t in tokenize_examples(items, tokenizer, max_length)]
        predictions = generate_answers(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            repetition_penalty=repetition_penalty,
        )
        answered, refused = predictions[: len(answerable)], predictions[len(answerable) :]
        metrics: dict[str, Any] = answer_metrics(answered, [e.answer for e in answerable], embedder=embedder)
        metrics["wrong_refusals"] = sum(map(is_refusal, answered)) / len(answered) if answered else 0.0
        if refusals:
            metrics["refusal_accuracy"] = sum(map(is_refusal, refused)) / len(refused)
            metrics["n_refusal"] = len(refusals)
        metrics["samples"] = [
            {"question": e.question, "reference": e.answer, "prediction": p}
            for e, p in list(zip(answerable, answered, strict=True))[:samples]
        ]
        # Every answer, so any subset (e.g. entries never trained on) can be scored without regenerating.
        metrics["items"] = [
            {
                "group": e.group,
                "question": e.question,
                "reference": e.answer,
                "prediction": p,
                "refusal_expected": e.refusal,
                "rouge_l": rouge_l(p, e.answer),
                "token_f1": token_f1(p, e.answer),
            }
            for e, p in zip(items, predictions, strict=True)
        ]
        results[layout] = metrics
    return results


def evaluate_model(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[SFTExample],
    tokenized: Sequence[TokenizedExample],
    *,
    pad_id: int,
    max_length: int,
    answers: bool = True,
    **answer_kwargs: Any,
) -> dict[str, Any]:
    """Loss/perplexity on ``tokenized`` (overall and per layout) plus, with ``answers``,
    :func:`evaluate_answers` on ``examples``."""
    result: dict[str, Any] = dict(evaluate_loss(model, tokenized, pad_id=pad_id))
    layouts = sorted({t.layout for t in tokenized})
    if len(layouts) > 1:
        for layout in layouts:
            subset = [t for t in tokenized if t.layout == layout]
            result[layout] = {
                f"{k}": v for k, v in evaluate_loss(model, subset, pad_id=pad_id).items() if k != "tokens"
            }
    if answers and examples:
        for layout, metrics in evaluate_answers(
            model, tokenizer, examples, max_length=max_length, **answer_kwargs
        ).items():
            result.setdefault(layout, {}).update(metrics)
    return result


# --------------------------------------------------------------------------------------------------
# Report

_ROWS = [
    ("loss", None, "eval loss"),
    ("perplexity", None, "perplexity"),
    ("loss", "rag", "RAG loss"),
    ("loss", "closed", "closed-book loss"),
    ("rouge_l", "rag", "RAG ROUGE-L"),
    ("token_f1", "rag", "RAG token F1"),
    ("embedding_cosine", "rag", "RAG embedding cosine"),
    ("refusal_accuracy", "rag", "RAG refusals when the entries lack the answer"),
    ("wrong_refusals", "rag", "RAG refusals when the entries have the answer"),
    ("rouge_l", "closed", "closed-book ROUGE-L"),
    ("token_f1", "closed", "closed-book token F1"),
    ("embedding_cosine", "closed", "closed-book embedding cosine"),
]


def _metric(section: Mapping[str, Any], key: str, layout: str | None) -> float | None:
    source = section.get(layout, {}) if layout else section
    value = source.get(key) if isinstance(source, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def summary_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(label, before, after) for each metric present in either evaluation."""
    rows = []
    for key, layout, label in _ROWS:
        b, a = _metric(before, key, layout), _metric(after, key, layout)
        if b is not None or a is not None:
            rows.append((label, b, a))
    return rows


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: summary, metrics table before/after, loss curve, sample answers."""
    data, train = report.get("data", {}), report.get("training", {})
    before, after = report.get("before", {}), report.get("after", {})
    lines = [f"# Fine-tuning report: {report.get('adapter', '?')}", ""]
    lines.append(f"- base model: `{report.get('base_model', '?')}`; created {report.get('created_at', '?')}")
    if data:
        lines.append(
            f"- data: {data.get('train_examples', '?')} training examples from {data.get('train_groups', '?')} "
            f"entries, {data.get('eval_examples', '?')} eval examples ({data.get('eval_groups', '?')} entries); "
            f"layout {data.get('layout', '?')}; dataset hash `{str(report.get('dataset_hash', ''))[:12]}`"
        )
        length = data.get("length") or {}
        if length and length.get("max_length_used") != length.get("max_length"):
            lines.append(
                f"- length budget grown from {length.get('max_length')} to {length.get('max_length_used')} tokens "
                "to fit the longest examples"
            )
        skipped = [*length.get("skipped_too_long", []), *length.get("eval_skipped_too_long", [])]
        if skipped:
            listed = ", ".join(f"{s['source']} ({s['layout']}, {s['tokens']} tokens)" for s in skipped)
            lines.append(f"- skipped, longer than the model's context: {listed}")
    if train:
        lines.append(
            f"- training: {train.get('steps', '?')} steps in {float(train.get('seconds', 0)):.0f} s, "
            f"{float(train.get('tokens_per_s', 0)):.0f} real tokens/s, final loss {_fmt(train.get('final_loss'))}, "
            f"peak RSS {float(train.get('peak_rss_mb', 0)) / 1024:.2f} GB"
        )
    lines += ["", "| metric | before | after | change |", "|---|---:|---:|---:|"]
    for label, b, a in summary_rows(before, after):
        change = f"{a - b:+.3f}" if a is not None and b is not None else "–"
        lines.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {change} |")
    if report.get("loss_curve_png"):
        lines += ["", f"![loss curve]({Path(str(report['loss_curve_png'])).name})"]
    for layout in ("rag", "closed"):
        samples_after = after.get(layout, {}).get("samples", []) if isinstance(after.get(layout), Mapping) else []
        samples_before = before.get(layout, {}).get("samples", []) if isinstance(before.get(layout), Mapping) else []
        if not samples_after:
            continue
        lines += ["", f"## Sample answers ({layout})"]
        for i, sample in enumerate(samples_after):
            lines += ["", f"**Q:** {sample['question']}", "", f"- reference: {sample['reference']}"]
            if i < len(samples_before):
                lines.append(f"- before: {samples_before[i]['prediction'] or '(empty)'}")
            lines.append(f"- after: {sample['prediction'] or '(empty)'}")
    return "\n".join(lines) + "\n"


def plot_loss_curve(
    losses: Sequence[Sequence[float]], eval_losses: Sequence[Sequence[float]], path: Path | str, *, title: str = ""
) -> Path | None:
    """Training loss per step (and eval loss points) as a PNG; None when there is nothing to plot."""
    if not losses:
        return None
    # The object API with the Agg canvas: no pyplot, no global backend switch, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([s for s, _ in losses], [v for _, v in losses], label="training loss", linewidth=1)
    if len(losses) >= 10:
        window = max(len(losses) // 20, 3)
        smooth = [
            sum(v for _, v in losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(losses))
        ]
        ax.plot([s for s, _ in losses], smooth, label=f"training loss (mean of {window})", linewidth=2)
    if eval_losses:
        ax.plot([s for s, _ in eval_losses], [v for _, v in eval_losses], "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_title(title or "LoRA fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path


def write_report(report: dict[str, Any], folder: Path | str, *, stem: str = "report") -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and ``loss_curve.png`` into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    training = report.get("training", {})
    png = plot_loss_curve(
        training.get("losses", []),
        training.get("eval_losses", []),
        folder / "loss_curve.png",
        title=str(report.get("adapter", "")),
    )
    if png is not None:
        report["loss_curve_png"] = str(png)
        paths["png"] = png
    paths["json"] = folder / f"{stem}.json"
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=str) + "\n")
    paths["markdown"] = folder / f"{stem}.md"
    atomic_write_text(paths["markdown"], render_markdown(report))
    return paths
