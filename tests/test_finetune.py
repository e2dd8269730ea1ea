"""The LoRA fine-tuning recipe end to end on the tiny random Llama (seconds on a CPU).

Covers data (layouts, labels, split, errors), the loop (loss falls, resume, Ctrl-C), adapters (peft
format, registry, merge), evaluation (metrics, batched generation, report) and the CLI. Tests that
load SmolLM2 or MiniLM are marked ``slow``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from chatbot.adapters import AdapterError, AdapterRegistry
from chatbot.settings import Settings
from finetune import evaluate as ev
from finetune.data import (
    REFUSAL,
    DataError,
    QAPair,
    build_examples,
    dataset_hash,
    end_of_turn_ids,
    lexical_retriever,
    load_pairs,
    pairs_from_conversations,
    pairs_from_entries,
    prepare_data,
    split_by_group,
    tokenize_examples,
)
from finetune.lora import LoraSetupError, apply_lora, resolve_target_modules, save_adapter
from finetune.train import TrainingInterrupted, WarmupCosine, answer_loss, collate, fit, latest_checkpoint
from knowledge_base.entry import FAQEntry
from knowledge_base.errors import NotFoundError

torch = pytest.importorskip("torch")

TOY = [
    ("sky", "What color is the sky?", ["Which colour is the sky?"], "The sky is blue."),
    ("grass", "What color is grass?", ["Which colour is grass?"], "Grass is green."),
    ("snow", "What color is snow?", [], "Snow is white."),
    ("fox", "What does the fox do?", ["What is the fox doing?"], "The quick brown fox jumps over the lazy dog."),
    ("cancel", "How do I cancel an order?", [], "Go to Account > Orders and click Cancel order."),
    ("ship", "How long does shipping take?", ["When will my order arrive?"], "Standard shipping takes 3-7 days."),
]


def toy_entries() -> list[FAQEntry]:
    return [FAQEntry(id=i, question=q, alt_questions=tuple(a), answer=ans) for i, q, a, ans in TOY]


def ft_settings(settings: Settings, **finetune: Any) -> Settings:
    defaults = {
        "rank": 8,
        "alpha": 16,
        "dropout": 0.0,
        "learning_rate": 1e-2,
        "micro_batch_size": 4,
        "grad_accum_steps": 1,
        "max_length": 512,
        "warmup_ratio": 0.0,
        "checkpoint_every": 0,
        "layout": "closed",
        "seed": 7,
    }
    return settings.replace(finetune={**defaults, **finetune})


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One torch thread: tiny matmuls on 2 shared cores are ~30x slower with 2 threads (PITFALLS #21)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama with a larger final-norm gain.

    Its logits are tiny otherwise (tied embeddings of std 0.02 behind a unit RMSNorm: at most ~0.6
    apart), and LoRA, which leaves norms and embeddings frozen, could not make any answer likely.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("toy-llama")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.fill_(10.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(toy_model_dir: Path) -> tuple[Any, Any]:
    """(tokenizer, model factory): each call to the factory loads a fresh float32 copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatbot.models import quiet_transformers

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(toy_model_dir)

    def load() -> Any:
        return AutoModelForCausalLM.from_pretrained(toy_model_dir, dtype=torch.float32)

    return tokenizer, load


def toy_tokenized(tokenizer: Any, ids: tuple[str, ...] = ()) -> list[Any]:
    """Closed-book toy examples (of the entries ``ids``, or all)."""
    entries = [e for e in toy_entries() if not ids or e.id in ids]
    examples = build_examples(pairs_from_entries(entries), layout="closed", refusal_fraction=0.0, seed=0)
    return tokenize_examples(examples, tokenizer, 512)


#: Few enough answers for the tiny random model to learn them by heart in a few dozen steps.
MEMORIZABLE = ("sky", "snow")


# --------------------------------------------------------------------------------------------------
# Data


def test_labels_cover_only_the_answer_and_its_end_token(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    (example,) = build_examples([QAPair("What color is snow?", "Snow is white.", "snow", "t")], layout="closed")
    (tok,) = tokenize_examples([example], tokenizer, 512)
    end = end_of_turn_ids(tokenizer)
    assert tokenizer.convert_ids_to_tokens(end) == ["<|im_end|>"]
    answer = list(tokenizer("Snow is white.", add_special_tokens=False)["input_ids"])
    labels = tok.labels()
    assert labels[: tok.prompt_len] == [-100] * tok.prompt_len
    assert labels[tok.prompt_len :] == answer + end
    # The prompt is exactly what the engine renders for generation (training = serving).
    from chatbot.models import chat_token_ids

    assert list(tok.input_ids[: tok.prompt_len]) == chat_token_ids(tokenizer, example.messages())

    # Padding uses the same id as the end token (pad = eos): masked by position, the end token stays.
    pad = tokenizer.pad_token_id
    assert pad == end[0]
    short = tokenize_examples(build_examples([QAPair("Hi?", "Yo.", "g", "s")], layout="closed"), tokenizer, 512)[0]
    batch = collate([tok, short], pad, "cpu")
    row = batch.labels[1].tolist()
    assert row[short.prompt_len : len(short)] == list(short.input_ids[short.prompt_len :])
    assert row[len(short) - 1] == pad  # the trained end token, although it equals the pad id
    assert all(x == -100 for x in row[len(short) :])  # padding after it is not trained
    assert batch.n_targets == tok.n_answer_tokens + short.n_answer_tokens


def test_rag_layout_uses_the_engine_prompt_and_always_shows_the_gold_entry() -> None:
    from chatbot.prompts import build_messages

    entries = toy_entries()
    # A retriever that never finds the right entry: the gold one must be put in anyway.
    wrong = [e for e in entries if e.id in ("fox", "cancel", "ship")]
    pairs = pairs_from_entries([e for e in entries if e.id == "sky"])
    examples = build_examples(pairs, layout="rag", retrieve=lambda q: wrong, k=3, refusal_fraction=0.0, seed=3)
    assert len(examples) == 2
    for ex in examples:
        assert len(ex.context) == 3 and "sky" in [e.id for e in ex.context]
        assert ex.gold_ids == ("sky",)
        assert ex.messages() == build_messages(ex.question, ex.context)

    refusals = [
        e
        for e in build_examples(
            pairs_from_entries(entries), layout="rag", retrieve=lexical_retriever(entries, 3), refusal_fraction=0.5
        )
        if e.refusal
    ]
    assert len(refusals) == 5
    for ex in refusals:
        assert ex.answer == REFUSAL and ex.group not in [e.id for e in ex.context]


def test_split_by_entry_has_no_leakage() -> None:
    entries = [
        FAQEntry(id=f"e{i}", question=f"question {i}?", alt_questions=(f"q {i} alt?",), answer=f"a{i}")
        for i in range(20)
    ]
    data = prepare_data(
        pairs_from_entries(entries),
        layout="both",
        eval_fraction=0.25,
        seed=1,
        retrieve=lexical_retriever(entries, 5),
        k=3,
    )
    eval_groups = {p.group for p in data.eval_pairs}
    assert len(eval_groups) == 5 and data.stats["eval_groups"] == 5
    assert not eval_groups & {p.group for p in data.train_pairs}
    train_text = json.dumps([e.to_dict() for e in data.train])
    for entry in entries:
        if entry.id in eval_groups:
            for question in entry.questions:
                assert question not in train_text  # not as a target, not as retrieved context
    train, held = split_by_group(pairs_from_entries(entries), 0.25, seed=1)
    assert {p.group for p in held} == eval_groups and len(train) + len(held) == 40


def test_dedupe_and_explicit_eval_file_drop_overlaps(tmp_path: Path) -> None:
    pairs = pairs_from_entries(toy_entries())
    data = prepare_data([*pairs, pairs[0]], layout="closed", eval_fraction=0.2, seed=0)
    assert data.stats["duplicates_dropped"] == 1
    held = [QAPair("What color is the sky?", "The sky is blue.", "sky", "eval.jsonl:1")]
    data = prepare_data(pairs, layout="closed", eval_fraction=0.2, seed=0, eval_pairs=held)
    assert data.stats["dropped_overlapping_eval"] == 2  # both phrasings of "sky"
    assert all(p.group != "sky" for p in data.train_pairs)


def test_conversation_pairs_join_their_entry() -> None:
    class Pair:
        def __init__(self, question: str, answer: str, sources: list[str], origin: str, message_id: int) -> None:
            self.question, self.answer, self.sources, self.origin, self.message_id = (
                question,
                answer,
                sources,
                origin,
                message_id,
            )

    pairs = pairs_from_conversations(
        [
            Pair("sky colour??", "Blue, as always.", ["sky"], "correction", 12),
            Pair("hello", "Hi! How can I help?", [], "thumbs_up", 13),
            Pair("", "dropped", [], "thumbs_up", 14),
        ],
        toy_entries(),
    )
    assert pairs[0].group == "sky" and pairs[0].gold[0].id == "sky"
    assert pairs[0].source == "conversation:12(correction)"
    assert pairs[1].group.startswith("answer:") and len(pairs) == 2


def test_every_external_layout_parses(tmp_path: Path) -> None:
    records = [
        {"question": "Q1?", "answer": "A1.", "faq_id": "f1", "alt_questions": ["Q1 again?"]},
        {
            "messages": [
                {"role": "system", "content": "be nice"},
                {"role": "user", "content": "Q2?"},
                {"role": "assistant", "content": "A2."},
            ]
        },
        {"instruction": "Q3?", "input": "for a friend", "output": "A3.", "history": [["hi", "hello"]]},
        {"conversations": [{"from": "human", "value": "Q4?"}, {"from": "gpt", "value": "A4."}]},
    ]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    pairs = load_pairs(jsonl)
    assert [(p.question, p.answer) for p in pairs] == [
        ("Q1?", "A1."),
        ("Q1 again?", "A1."),
        ("Q2?", "A2."),
        ("Q3?\nfor a friend", "A3."),
        ("Q4?", "A4."),
    ]
    assert pairs[0].group == pairs[1].group == "f1"
    assert pairs[3].history == (("user", "hi"), ("assistant", "hello"))
    assert pairs[2].source == "data.jsonl:2"

    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(records), encoding="utf-8")
    assert [p.answer for p in load_pairs(as_json)] == [p.answer for p in pairs]

    table = tmp_path / "faq.csv"
    with table.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "question", "alt_questions", "answer"])
        writer.writerow(["x1", "How?", "How so? | Why?", "Like this.\nOn two lines."])
        writer.writerow(["x2", "When?", "", "Now."])
    csv_pairs = load_pairs(table)
    assert [p.question for p in csv_pairs] == ["How?", "How so?", "Why?", "When?"]
    assert csv_pairs[3].source == "faq.csv:4"  # the multi-line answer above spans lines 2-3
    assert {p.group for p in csv_pairs} == {"x1", "x2"}


def test_bad_data_errors_name_file_and_line(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        load_pairs(empty)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"question": "ok?", "answer": "fine"}\n{"question": "no answer?"}\n{not json\n'
        '{"messages": [{"role": "user", "content": "hi"}]}\n{"instruction": "x"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        load_pairs(bad)
    where = [p.where for p in info.value.problems]
    assert where == ["bad.jsonl:2", "bad.jsonl:3", "bad.jsonl:4", "bad.jsonl:5"]
    assert "missing field 'answer'" in info.value.problems[0].message
    assert "no assistant message" in info.value.problems[2].message
    assert "bad.jsonl:2" in str(info.value)

    table = tmp_path / "t.csv"
    table.write_text("question,answer\nQ?,A.\nQ2?,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"t\.csv:3"):
        load_pairs(table)
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(tmp_path / "data.parquet")

    tokenizer, _ = tiny
    long = [QAPair("Long?", "word " * 400, "g", "long.jsonl:7")]
    with pytest.raises(DataError, match=r"long\.jsonl:7 \(closed\).*raise --max-length to at least"):
        tokenize_examples(build_examples(long, layout="closed"), tokenizer, 128)


def test_too_long_prompts_lose_context_entries_before_failing(tiny: tuple[Any, Any]) -> None:
    tokenizer, _ = tiny
    entries = toy_entries()
    filler = [FAQEntry(id=f"f{i}", question=f"Filler {i}?", answer="lorem ipsum dolor " * 20) for i in range(3)]
    pair = pairs_from_entries([entries[0]])[:1]
    (example,) = build_examples(pair, layout="rag", retrieve=lambda q: filler, k=3, refusal_fraction=0.0, seed=0)
    full = tokenize_examples([example], tokenizer, 4096)[0]
    (shortened,) = tokenize_examples([example], tokenizer, len(full) - 10)
    text = tokenizer.decode(shortened.input_ids)
    assert "The sky is blue." in text and len(shortened) < len(full)
    assert text.count("lorem") < tokenizer.decode(full.input_ids).count("lorem")


# --------------------------------------------------------------------------------------------------
# LoRA set-up and the loss


def test_target_modules_per_architecture(tiny: tuple[Any, Any]) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    _, load = tiny
    model = load()
    assert resolve_target_modules(model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_target_modules(model, "attention+mlp")[-3:] == ["gate_proj", "up_proj", "down_proj"]
    assert resolve_target_modules(model, "q_proj, v_proj") == ["q_proj", "v_proj"]
    assert resolve_target_modules(model, "all-linear") == "all-linear"
    with pytest.raises(LoraSetupError, match=r"(?s)qkv.*down_proj"):
        resolve_target_modules(model, "qkv")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    assert resolve_target_modules(gpt2) == ["c_attn", "c_proj"]


def test_fast_loss_modes_equal_the_full_forward(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Sliced head, chunked cross-entropy and the shared system-prompt prefix: same loss, same gradients."""
    from finetune.train import choose_loss_mode

    tokenizer, load = tiny
    model = _lora_with_gradients_everywhere(load())
    batch = collate(toy_tokenized(tokenizer)[:3], tokenizer.pad_token_id)
    assert batch.shared_prefix > 50  # the system prompt and the chat markup before the question

    full, full_grads = _loss_and_grads(model, batch, "full")
    with torch.no_grad():
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert torch.allclose(full / batch.n_targets, reference, rtol=1e-5)
    modes = ["sliced", "shared-prefix"]
    monkeypatch.setattr("finetune.loss.CE_CHUNK_ROWS", 7)  # and the chunked cross-entropy
    for mode in [*modes, *modes]:
        loss, grads = _loss_and_grads(model, batch, mode)
        assert torch.allclose(loss, full, rtol=1e-5), mode
        for g, r in zip(grads, full_grads, strict=True):  # equal up to float32 summation order
            assert torch.allclose(g, r, rtol=1e-4, atol=1e-5 * float(r.abs().max())), mode
    assert choose_loss_mode(model, batch) == "shared-prefix"
    # Rows that share less than a prompt's worth of tokens, or a single row, run whole.
    assert collate(toy_tokenized(tokenizer)[:1], tokenizer.pad_token_id).shared_prefix == 0


def _lora_with_gradients_everywhere(base: Any) -> Any:
    """LoRA on ``base`` with a non-zero B, so every LoRA weight gets a gradient; dropout off."""
    torch.manual_seed(0)
    model = apply_lora(base, ft_settings(Settings()).finetune)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    return model


def _loss_and_grads(model: Any, batch: Any, mode: str) -> tuple[Any, list[Any]]:
    from finetune.loss import autocast, compute_dtype

    model.zero_grad(set_to_none=True)
    with autocast(batch.input_ids.device, compute_dtype(model)):
        loss = answer_loss(model, batch, mode=mode)  # type: ignore[arg-type]
    loss.backward()
    return loss.detach().float(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_the_batch_carries_its_answer_positions_as_indices(tiny: tuple[Any, Any]) -> None:
    """The positions the loss reads are exactly the label mask's (host-side, no device round trip)."""
    tokenizer, _ = tiny
    examples = toy_tokenized(tokenizer)[:4]
    batch = collate(examples, tokenizer.pad_token_id)
    shifted = batch.labels[:, 1:]
    rows, positions = (shifted != -100).nonzero(as_tuple=True)
    assert torch.equal(batch.target_rows, rows) and torch.equal(batch.target_positions, positions)
    assert torch.equal(batch.target_ids, shifted[shifted != -100])
    assert batch.n_targets == len(batch.target_ids)
    prefix = batch.shared_prefix
    assert prefix < min(ex.prompt_len for ex in examples)
    assert (batch.input_ids[:, :prefix] == batch.input_ids[:1, :prefix]).all()
    assert not (batch.input_ids[:, prefix] == batch.input_ids[0, prefix]).all()


def test_the_agreement_tolerance_separates_rounding_noise_from_a_wrong_gradient() -> None:
    """Noise the size of bf16 rounding passes the bf16 check (not the float32 one); a gradient that
    lost part of its contributions fails both."""
    from finetune.loss import agreement_tolerance, gradient_disagreement

    gen = torch.Generator().manual_seed(0)
    ref = [torch.randn(16, 64, generator=gen) for _ in range(6)] + [torch.zeros(64, 16)]  # LoRA A before B moves
    loss = torch.tensor(3.0)

    def noisy(scale: float) -> list[Any]:
        return [r + scale * r.abs().mean() * torch.randn(r.shape, generator=gen) for r in ref]

    bf16, fp32 = agreement_tolerance(torch.bfloat16), agreement_tolerance(torch.float32)
    assert fp32 == pytest.approx(1e-3) and bf16 > 20 * fp32
    rounding = gradient_disagreement(loss * (1 + 2**-8), noisy(2**-6), loss, ref)  # ~4 bf16 roundings
    assert fp32 < rounding < bf16 / 4
    cut = [r.clone() for r in ref]
    cut[2] *= 0.6  # a third of one tensor's gradient missing (e.g. none through the shared prefix)
    assert gradient_disagreement(loss, cut, loss, ref) > bf16
    assert gradient_disagreement(loss * 1.5, ref, loss, ref) > bf16
    assert gradient_disagreement(torch.tensor(float("nan")), ref, loss, ref) == float("inf")


@pytest.fixture
def bf16_model(tiny: tuple[Any, Any]) -> Any:
    """The toy model with its base in bfloat16 (LoRA weights stay float32, as peft keeps them):
    what training runs on a GPU, simulated under CPU bf16 autocast."""
    _, load = tiny
    return _lora_with_gradients_everywhere(load().to(torch.bfloat16))


def test_fast_loss_modes_are_kept_under_bf16(tiny: tuple[Any, Any], bf16_model: Any) -> None:
    """Correct fast modes under bf16 autocast differ from the full forward by bf16 rounding, which
    the float32 tolerance rejects (why a GPU fell back to the slowest mode) and the bf16 one accepts."""
    from finetune.loss import agreement_tolerance, choose_loss_mode, gradient_disagreement

    tokenizer, _ = tiny
    batch = collate(toy_tokenized(tokenizer)[:3], tokenizer.pad_token_id)
    full = _loss_and_grads(bf16_model, batch, "full")
    for mode in ("sliced", "shared-prefix"):
        error = gradient_disagreement(*_loss_and_grads(bf16_model, batch, mode), *full)
        assert agreement_tolerance(torch.float32) < error < agreement_tolerance(torch.bfloat16), mode
    assert choose_loss_mode(bf16_model, batch) == "shared-prefix"


def test_wrong_fast_loss_modes_are_rejected_under_bf16(
    tiny: tuple[Any, Any], bf16_model: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A shared prefix whose cache carries no gradients falls back to the sliced head; a model whose
    logits are not a plain head over the decoder falls back to its own forward."""
    from finetune import loss as loss_module

    tokenizer, _ = tiny
    batch = collate(toy_tokenized(tokenizer)[:3], tokenizer.pad_token_id)
    returned_cache = loss_module._returned_cache

    def detached_cache(output: Any) -> Any:
        cache = returned_cache(output)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
        return cache

    monkeypatch.setattr(loss_module, "_returned_cache", detached_cache)
    with caplog.at_level("WARNING", logger="finetune.loss"):
        assert loss_module.choose_loss_mode(bf16_model, batch) == "sliced"
    assert "shared-prefix disagrees" in caplog.text
    monkeypatch.setattr(loss_module, "_returned_cache", returned_cache)

    decoder_and_head = loss_module._decoder_and_head

    def scaled_head(model: Any) -> Any:  # logits x 2, as a model with a logit scale would have
        decoder, head = decoder_and_head(model)
        return decoder, lambda hidden: 2 * head(hidden)

    monkeypatch.setattr(loss_module, "_decoder_and_head", scaled_head)
    assert loss_module.choose_loss_mode(bf16_model, batch) == "full"


def test_the_faster_agreeing_mode_is_timed_not_assumed(tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the agreeing modes are timed on a real micro-batch (here on a fake clock that each
    pass advances); the faster wins, and a near-tie (within 3%) keeps the earlier mode."""
    from finetune import loss as loss_module

    tokenizer, load = tiny
    model = _lora_with_gradients_everywhere(load())
    batch = collate(toy_tokenized(tokenizer)[:2], tokenizer.pad_token_id)
    clock = [0.0]
    monkeypatch.setattr(loss_module.time, "perf_counter", lambda: clock[0])
    pass_seconds = {"shared-prefix": 0.30, "sliced": 0.20}

    def run(mode: str, on: Any) -> None:
        assert on is batch
        clock[0] += pass_seconds[mode]

    modes = ["shared-prefix", "sliced"]
    assert loss_module._fastest(model, batch, modes, run) == "sliced"
    pass_seconds["shared-prefix"] = 0.205
    assert loss_module._fastest(model, batch, modes, run) == "shared-prefix"


# --------------------------------------------------------------------------------------------------
# Training


def _train(load: Any, data: list[Any], settings: Settings, run_dir: Path, **kwargs: Any) -> tuple[Any, Any]:
    torch.manual_seed(settings.finetune.seed)
    model = apply_lora(load(), settings.finetune)
    result = fit(model, data, settings.finetune, run_dir=run_dir, pad_id=2, progress_bar=False, **kwargs)
    return model, result


def test_loss_falls_on_a_memorizable_set(tiny: tuple[Any, Any], settings: Settings, tmp_path: Path) -> None:
    tokenizer, load = tiny
    data = toy_tokenized(tokenizer, MEMORIZABLE)
    s = ft_settings(settings, target_modules="all-linear", micro_batch_size=2, grad_accum_steps=2)
    before = ev.evaluate_loss(load(), data, pad_id=tokenizer.pad_token_id)["loss"]
    seen: list[dict[str, Any]] = []
    model, result = _train(load, data, s, tmp_path / "run", max_steps=30, on_progress=seen.append)
    after = ev.evaluate_loss(model, data, pad_id=tokenizer.pad_token_id)["loss"]
    assert after < 0.4 * before
    assert result.steps == 30 and len(result.losses) == 30 and result.losses[-1][1] < result.losses[0][1] / 2
    assert result.tokens == seen[-1]["tokens"] > 0 and result.target_tokens > 0
    assert {"step", "total_steps", "loss", "lr", "tokens_per_s", "eta_s", "epoch"} <= set(seen[-1])
    assert seen[-1]["eta_s"] == 0 and seen[0]["step"] == 1


def test_float16_training_scales_its_loss_and_resumes_the_scale(
    tiny: tuple[Any, Any], settings: Settings, tmp_path: Path
) -> None:
    """A float16 base (a GPU without bf16) trains under fp16 autocast with a GradScaler, whose
    state is checkpointed with the run; here under CPU fp16 autocast."""
    tokenizer, load = tiny
    data = toy_tokenized(tokenizer, MEMORIZABLE)
    s = ft_settings(settings, target_modules="all-linear", micro_batch_size=2, checkpoint_every=4)
    before = ev.evaluate_loss(load(), data, pad_id=tokenizer.pad_token_id)["loss"]
    model, result = _train(lambda: load().to(torch.float16), data, s, tmp_path / "run", max_steps=12)
    assert all(math.isfinite(loss) for _, loss in result.losses)
    assert ev.evaluate_loss(model, data, pad_id=tokenizer.pad_token_id)["loss"] < 0.8 * before
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # master weights
    saved = torch.load(latest_checkpoint(tmp_path / "run") / "trainer_state.pt", weights_only=True)
    # The first steps overflowed at the initial scale 2**16 and were skipped, not applied.
    assert 0 < saved["scaler"]["scale"] < 2**16


def test_a_time_limit_stops_before_the_step_that_would_overrun_it(
    tiny: tuple[Any, Any], settings: Settings, tmp_path: Path
) -> None:
    tokenizer, load = tiny
    data = toy_tokenized(tokenizer)
    s = ft_settings(settings, micro_batch_size=2, grad_accum_steps=1)
    _, result = _train(load, data, s, tmp_path / "run", max_steps=20, time_limit_s=1e-9)
    assert result.steps == 1 and result.stopped_early
    _, unhurried = _train(load, data, s, tmp_path / "run2", max_steps=3, time_limit_s=3600)
    assert unhurried.steps == 3 and not unhurried.stopped_early


def test_the_schedule_warms_up_then_decays_to_zero_at_its_horizon():
    schedule = WarmupCosine(100, warmup_ratio=0.1)
    assert schedule(0) < schedule(9) < 1 and schedule(10) == 1.0 and schedule(100) == 0.0
    schedule.fit_to(steps_done=20, seconds_left=10.0, seconds_per_step=1.0)  # 10 more steps fit
    assert schedule.horizon == 30 and schedule(30) == 0.0 and schedule(25) < 0.5
    schedule.fit_to(steps_done=20, seconds_left=1e6, seconds_per_step=1.0)  # never past the planned steps
    assert schedule.horizon == 100


def test_a_time_limited_run_ends_with_a_decayed_learning_rate(
    tiny: tuple[Any, Any], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finetune import train

    clock = iter(range(10**9))  # a fake clock: every reading is 0.1 s after the last
    monkeypatch.setattr(train.time, "perf_counter", lambda: next(clock) / 10)
    tokenizer, load = tiny
    data = toy_tokenized(tokenizer)
    s = ft_settings(settings, micro_batch_size=2, grad_accum_steps=1, warmup_ratio=0.0)
    seen: list[dict[str, Any]] = []
    _, result = _train(load, data, s, tmp_path / "run", max_steps=200, time_limit_s=3.0, on_progress=seen.append)
    assert result.stopped_early and 3 < result.steps < 50
    peak = s.finetune.learning_rate
    # The rate the last step handed on is near 0, not the ~0.9 x peak of a 200-step cosine cut short.
    assert seen[-1]["lr"] < 0.1 * peak and max(i["lr"] for i in seen) > 0.5 * peak


def test_resume_continues_at_the_same_step_and_reaches_the_same_loss(
    tiny: tuple[Any, Any], settings: Settings, tmp_path: Path
) -> None:
    tokenizer, load = tiny
    data = toy_tokenized(tokenizer)
    # Dropout on, so the RNG state must be restored too; 2 micro-batches per step (accumulation).
    s = ft_settings(settings, dropout=0.1, micro_batch_size=2, grad_accum_steps=2, learning_rate=5e-3)
    steps = 8
    _, straight = _train(load, data, s, tmp_path / "a", max_steps=steps)

    def interrupt(info: dict[str, Any]) -> None:
        if info["step"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C does mid-run

    with pytest.raises(TrainingInterrupted) as stopped:
        _train(load, data, s, tmp_path / "b", max_steps=steps, fingerprint="h", on_progress=interrupt)
    assert stopped.value.step == 3 and stopped.value.checkpoint is not None
    checkpoint = latest_checkpoint(tmp_path / "b")
    assert checkpoint is not None and checkpoint.name == "step-000003"
    assert json.loads((checkpoint / "state.json").read_text())["micro_batch"] == 6
    assert (checkpoint / "adapter" / "adapter_config.json").is_file()

    steps_seen: list[int] = []
    _, resumed = _train(
        load,
        data,
        s,
        tmp_path / "b",
        max_steps=steps,
        fingerprint="h",
        resume=True,
        on_progress=lambda info: steps_seen.append(info["step"]),
    )
    assert resumed.resumed_from == 3 and steps_seen[0] == 4 and resumed.steps == steps
    assert [step for step, _ in resumed.losses] == list(range(1, steps + 1))
    assert resumed.last_loss == pytest.approx(straight.last_loss, rel=0.01)
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=0.01)

    # A checkpoint of other data is refused with the fix.
    from finetune.train import TrainingError

    with pytest.raises(TrainingError, match=r"(?s)dataset_hash.*--restart"):
        _train(load, data, s, tmp_path / "b", max_steps=steps, fingerprint="other", resume=True)


def test_periodic_checkpoints_keep_the_last_two(tiny: tuple[Any, Any], settings: Settings, tmp_path: Path) -> None:
    tokenizer, load = tiny
    s = ft_settings(settings, checkpoint_every=2)
    _train(load, toy_tokenized(tokenizer), s, tmp_path / "run", max_steps=7)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert names == ["step-000004", "step-000006"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000006"


# --------------------------------------------------------------------------------------------------
# Adapters


@pytest.fixture(scope="module")
def trained_adapter(tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter that learned one answer by heart (so it visibly changes the output)."""
    from chatbot.settings import load_settings

    tokenizer, load = tiny
    root = tmp_path_factory.mktemp("adapter")
    s = ft_settings(load_settings(env={}, overrides={"data_dir": str(root / "data")}), target_modules="all-linear")
    data = toy_tokenized(tokenizer, ("snow",))
    model, _ = _train(load, data, s, root / "run", max_steps=80)
    folder = root / "data" / "adapters" / "toy"
    save_adapter(model, folder, {"base_model": "tiny", "dataset_hash": dataset_hash(data), "created_at": "2026-01-01"})
    return folder


def _greedy(model: Any, tokenizer: Any, question: str, n: int = 8) -> list[int]:
    from chatbot.models import chat_token_ids
    from chatbot.prompts import build_closed_book_messages

    ids = torch.tensor([chat_token_ids(tokenizer, build_closed_book_messages(question))])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def test_adapter_is_standard_peft_and_changes_greedy_output(
    trained_adapter: Path, tiny: tuple[Any, Any], tiny_settings: Settings, toy_model_dir: Path
) -> None:
    from peft import PeftModel

    tokenizer, load = tiny
    files = {p.name for p in trained_adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "supportbot_adapter.json"} <= files
    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8

    base_out = _greedy(load().eval(), tokenizer, "What color is snow?")
    tuned = PeftModel.from_pretrained(load(), str(trained_adapter)).eval()
    tuned_out = _greedy(tuned, tokenizer, "What color is snow?")
    assert tuned_out != base_out
    assert tokenizer.decode(tuned_out, skip_special_tokens=True).startswith("Snow is white")

    # The chat engine's generator picks it up at run time and answers differently.
    from chatbot.generation import LocalGenerator

    model_settings = tiny_settings.replace(model={"model": str(toy_model_dir), "repetition_penalty": 1.0}).model
    generator = LocalGenerator(model_settings, tiny_settings.data_dir)
    from chatbot.prompts import build_closed_book_messages

    messages = build_closed_book_messages("What color is snow?")
    plain = generator.generate(messages, max_new_tokens=8)
    generator.set_adapter(trained_adapter, "toy@1")
    adapted = generator.generate(messages, max_new_tokens=8)
    assert adapted != plain and adapted.startswith("Snow is white")
    assert generator.adapter == "toy@1"


def test_merge_equals_adapter_on_base(trained_adapter: Path, tiny: tuple[Any, Any], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.lora import merge_adapter

    tokenizer, load = tiny
    ids = torch.tensor([tokenizer("What color is the sky? The sky is blue.")["input_ids"]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(load(), str(trained_adapter)).eval()(input_ids=ids).logits
        base = load().eval()(input_ids=ids).logits
    out = merge_adapter(load(), trained_adapter, tmp_path / "merged", tokenizer=tokenizer)
    assert (out / "tokenizer_config.json").is_file() and (out / "supportbot_merged.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-2)


def test_merge_refuses_nan_weights(trained_adapter: Path, tiny: tuple[Any, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from finetune.lora import MergeError, merge_adapter

    _, load = tiny
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in trained_adapter.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    weights = load_file(str(broken / "adapter_model.safetensors"))
    first = next(k for k in weights if "lora_B" in k)
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, str(broken / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="NaN"):
        merge_adapter(load(), broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_registry_activate_deactivate_remove(tmp_path: Path) -> None:
    registry = AdapterRegistry(tmp_path)
    assert registry.list() == [] and registry.active() is None
    for name, created in (("v1", "2026-01-01T00:00:00+00:00"), ("v2", "2026-02-01T00:00:00+00:00")):
        folder = registry.path(name)
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "supportbot_adapter.json").write_text(json.dumps({"created_at": created, "base_model": "m"}))
    (tmp_path / "adapters" / ".v3.tmp").mkdir()  # a half-written folder is not listed
    assert [i.name for i in registry.list()] == ["v1", "v2"]

    info = registry.activate("v2")
    assert info.active and registry.active() == info
    assert json.loads((tmp_path / "adapters" / "active.json").read_text())["name"] == "v2"
    version = info.version
    (registry.path("v2") / "adapter_model.safetensors").write_bytes(b"new weights")
    changed = registry.active()
    assert changed is not None and changed.version != version  # the engine notices a retrained adapter

    with pytest.raises(AdapterError, match="deactivate") as refused:
        registry.remove("v2")
    assert "supportbot adapters deactivate" in refused.value.fix
    assert registry.deactivate() is not None and registry.active() is None
    assert registry.remove("v2").name == "v2" and [i.name for i in registry.list()] == ["v1"]
    assert not registry.path("v2").exists()
    with pytest.raises(NotFoundError, match=r"v2.*v1"):
        registry.activate("v2")
    with pytest.raises(AdapterError, match="not a valid adapter name"):
        registry.path("../evil")

    # An active adapter deleted behind the registry's back counts as none.
    registry.activate("v1")
    import shutil

    shutil.rmtree(registry.path("v1"))
    assert registry.active() is None


# --------------------------------------------------------------------------------------------------
# Evaluation


def test_metrics() -> None:
    assert ev.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4
    assert ev.rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert ev.rouge_l("", "") == 1.0 and ev.rouge_l("x", "") == 0.0 and ev.rouge_l("x y", "z") == 0.0
    assert ev.token_f1("The sky is blue.", "sky is BLUE") == 1.0
    assert ev.token_f1("blue sky", "the sky is blue") == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))
    assert ev.is_refusal("I don't know.") and ev.is_refusal("I don’t know, sorry") and not ev.is_refusal("I know.")

    class Fake:
        def embed(self, texts: list[str]) -> Any:
            import numpy as np

            return np.array([[1.0, 0.0] if "blue" in t else [0.0, 1.0] for t in texts], dtype=np.float32)

    scores = ev.answer_metrics(["blue", "red"], ["blue sky", "blue sea"], embedder=Fake())  # type: ignore[arg-type]
    assert scores["embedding_cosine"] == pytest.approx(0.5) and scores["n"] == 2


def test_batched_left_padded_generation_matches_one_by_one(tiny: tuple[Any, Any]) -> None:
    tokenizer, load = tiny
    model = load().eval()
    prompts = [t.input_ids[: t.prompt_len] for t in toy_tokenized(tokenizer)[:4]]
    assert len({len(p) for p in prompts}) > 1
    batched = ev.generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    single = [ev.generate_answers(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single


def test_report_files(tmp_path: Path) -> None:
    report = {
        "adapter": "v1",
        "training": {"steps": 3, "losses": [[1, 3.0], [2, 2.0], [3, 1.5]], "eval_losses": [[0, 3.1], [3, 1.8]]},
        "before": {"loss": 3.1, "perplexity": 22.2, "rag": {"rouge_l": 0.1, "samples": []}},
        "after": {"loss": 1.8, "perplexity": 6.0, "rag": {"rouge_l": 0.6, "samples": []}},
    }
    paths = ev.write_report(report, tmp_path)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["after"]["rag"]["rouge_l"] == 0.6
    markdown = paths["markdown"].read_text()
    assert "| RAG ROUGE-L | 0.100 | 0.600 | +0.500 |" in markdown and "loss_curve.png" in markdown


# --------------------------------------------------------------------------------------------------
# The recipe through the CLI


def test_cli_end_to_end(
    toy_model_dir: Path,
    tmp_path: Path,
    embedder: Any,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from chatbot.cli import main

    for name in [n for n in os.environ if n.startswith("SUPPORTBOT_")]:
        monkeypatch.delenv(name)
    # The fake embedder for the knowledge base and the answer metrics: no model is loaded.
    monkeypatch.setattr("knowledge_base.embeddings.make_embedder", lambda settings: embedder)
    monkeypatch.setattr("chatbot.services.make_embedder", lambda settings: embedder)
    faq = tmp_path / "toy.csv"
    with faq.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "question", "alt_questions", "answer"])
        for entry_id, question, alts, answer in TOY:
            writer.writerow([entry_id, question, " | ".join(alts), answer])
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"question": "Is it free?", "answer": "Yes, it is free."}) + "\n", encoding="utf-8")
    common = [
        "--data-dir",
        str(tmp_path / "data"),
        "--set",
        f"model.model={toy_model_dir}",
        "--set",
        "model.device=cpu",
        "--set",
        "model.max_new_tokens=6",
        "--json",
    ]

    def run(*argv: str) -> tuple[int, Any]:
        code = main([*argv, *common])
        out = capsys.readouterr().out.strip().splitlines()
        return code, json.loads(out[-1]) if out else None

    assert run("kb", "add", str(faq))[0] == 0
    code, result = run(
        "finetune",
        "--from-kb",
        "--train",
        str(extra),
        "--output",
        "toy-v1",
        "--max-steps",
        "3",
        "--lr",
        "0.01",
        "--rank",
        "4",
        "--max-length",
        "600",
        "--eval-items",
        "2",
        "--layout",
        "both",
        "--activate",
    )
    assert code == 0, result
    assert result["adapter"] == "toy-v1" and result["activated"] is True
    assert result["training"]["steps"] == 3 and result["data"]["eval_groups"] >= 1
    assert {"loss", "perplexity", "rag", "closed"} <= set(result["after"])
    assert 0.0 <= result["after"]["rag"]["rouge_l"] <= 1.0
    for kind in ("json", "markdown", "png"):
        assert Path(result["report"][kind]).is_file()
    meta = json.loads((tmp_path / "data" / "adapters" / "toy-v1" / "supportbot_adapter.json").read_text())
    assert (
        meta["base_model"] == str(toy_model_dir) and meta["settings"]["rank"] == 4 and len(meta["dataset_hash"]) == 64
    )

    code, listing = run("adapters", "list")
    assert code == 0 and listing["active"] == "toy-v1" and listing["adapters"][0]["name"] == "toy-v1"
    code, error = run("finetune", "--from-kb", "--output", "toy-v1", "--max-steps", "1")
    assert code == 2 and "--overwrite" in error["fix"]
    code, error = run("adapters", "remove", "toy-v1")
    assert code == 2 and "deactivate" in error["fix"]
    code, _ = run("adapters", "merge", "toy-v1", "--output", str(tmp_path / "merged"))
    assert code == 0 and (tmp_path / "merged" / "model.safetensors").is_file()
    assert run("adapters", "deactivate")[1] == {"active": None, "previous": "toy-v1"}
    assert run("adapters", "remove", "toy-v1") == (0, {"removed": "toy-v1"})
    code, error = run("finetune", "--output", "x")
    assert code == 2 and "--from-kb" in error["message"] + json.dumps(error.get("problems"))
    code, error = run("finetune", "--from-kb", "--output", "x", "--rank", "0")
    assert code == 2 and "finetune.rank" in json.dumps(error)


def test_cli_ctrl_c_then_resume(
    toy_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from chatbot.cli import main
    from finetune import train

    for name in [n for n in os.environ if n.startswith("SUPPORTBOT_")]:
        monkeypatch.delenv(name)
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": a, "faq_id": i}) + "\n" for i, q, _, a in TOY), encoding="utf-8"
    )
    argv = [
        "finetune",
        "--train",
        str(data),
        "--output",
        "r1",
        "--max-steps",
        "4",
        "--layout",
        "closed",
        "--no-answer-eval",
        "--data-dir",
        str(tmp_path / "data"),
        "--set",
        f"model.model={toy_model_dir}",
        "--json",
    ]
    real_fit = train.fit

    def fit_with_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        def progress(info: dict[str, Any]) -> None:
            if info["step"] == 2:
                raise KeyboardInterrupt

        return real_fit(*args, **{**kwargs, "on_progress": progress})

    monkeypatch.setattr(train, "fit", fit_with_ctrl_c)
    assert main(argv) == 130
    stopped = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stopped["step"] == 2 and "--resume" in stopped["fix"]
    assert main(argv) == 2  # a fresh start would discard the checkpoint: say how to choose
    assert "--restart" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fix"]
    monkeypatch.setattr(train, "fit", real_fit)
    assert main([*argv, "--resume"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["training"]["resumed_from"] == 2 and done["training"]["steps"] == 4
    assert not (tmp_path / "data" / "finetune" / "r1" / "checkpoints").exists()


# --------------------------------------------------------------------------------------------------
# Real models


@pytest.mark.slow
def test_real_model_short_run(settings: Settings) -> None:
    """SmolLM2-135M + MiniLM: a few steps on part of the demo FAQ, evaluated before and after."""
    from chatbot.services import demo_file
    from finetune.train import FinetuneRequest, run_finetune
    from knowledge_base.loaders import load_faq_file

    entries = load_faq_file(demo_file("faq.csv"), settings.kb).entries[:12]
    s = settings.replace(model={"device": "cpu"}, finetune={"max_length": 640, "checkpoint_every": 0})
    result = run_finetune(
        s,
        FinetuneRequest(output="smoke", from_kb=True, max_steps=2, eval_items=2),
        entries=entries,
        progress_bar=False,
    )
    after = result.report["after"]
    assert result.report["training"]["steps"] == 2 and after["loss"] < result.report["before"]["loss"] + 0.5
    assert "embedding_cosine" in after["rag"]
    assert AdapterRegistry(s.data_dir).get("smoke").metadata["base_model"] == "smollm2-135m-instruct"


@pytest.mark.slow  # three interpreters importing torch: minutes on a busy 2-core machine
def test_torchrun_two_processes_equal_one_with_accumulation(toy_model_dir: Path, tmp_path: Path) -> None:
    """Data parallel through the stock launcher (gloo on CPU): 2 processes x 1 micro-batch per step
    train exactly like 1 process x 2 accumulated micro-batches."""
    import socket
    import subprocess
    import sys

    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": a, "faq_id": i}) + "\n" for i, q, _, a in TOY), encoding="utf-8"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPPORTBOT_")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

    def args(name: str, accum: int) -> list[str]:
        return [
            "finetune",
            "--train",
            str(data),
            "--output",
            name,
            "--max-steps",
            "3",
            "--micro-batch-size",
            "2",
            "--grad-accum",
            str(accum),
            "--dropout",
            "0",
            "--lr",
            "0.01",
            "--layout",
            "closed",
            "--no-answer-eval",
            "--data-dir",
            str(tmp_path / "data"),
            "--set",
            f"model.model={toy_model_dir}",
            "--set",
            "model.threads=1",
            "--json",
        ]

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"]
    for cmd in (
        [sys.executable, "-m", "chatbot.cli", *args("one", 2)],
        [*launcher, "-m", "chatbot.cli", *args("two", 1)],
    ):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads((tmp_path / "data" / "finetune" / n / "report.json").read_text()) for n in ("one", "two")]
    one, two = (r["training"] for r in reports)
    assert two["processes"] == 2 and one["processes"] == 1
    assert one["tokens"] == two["tokens"] and one["steps"] == two["steps"] == 3
    for (_, a), (_, b) in zip(one["losses"], two["losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-4)
