"""Incremental detokenisation (chatbot.detokenize): the streamed deltas add up to the full decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from chatbot.detokenize import IncrementalDetokenizer

SMOLLM2 = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_configs" / "smollm2-tokenizer"
TEXTS = [
    "Your parcel ships in 3-7 business days.",
    "Café déjà vu: naïve façade, Straße, Ærøskøbing.",
    "Thanks! 🎉🚚📦 Your order 👩‍👩‍👧 is on its way 🇨🇦.",
    "配送には3〜7営業日かかります。退货请在30天内申请。배송은 무료입니다.",
    "Two  spaces,   three   spaces,\n\nnew lines\tand a tab , then  ' quotes ' and don't .",
    "  leading spaces and trailing ones  ",
    "Mixed: price €14.95 → ¥2,000 ≈ $13 ✓ — done…",
]


def _smollm2() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(SMOLLM2))


def _metaspace(tmp_path: Path) -> PreTrainedTokenizerFast:
    """A SentencePiece-style tokenizer (▁ for spaces, leading space dropped on decode), byte fallback."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>", *alphabet])
    tok.train_from_iterator(["Your parcel ships in a few business days. Thanks for your order."] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _stream(tokenizer, ids: list[int], chunk_sizes: list[int]) -> str:
    detok = IncrementalDetokenizer(tokenizer)
    out, i, k = [], 0, 0
    while i < len(ids):
        n = chunk_sizes[k % len(chunk_sizes)]
        out.append(detok.add(ids[i : i + n]))
        i, k = i + n, k + 1
    out.append(detok.finish())
    assert detok.text == "".join(out)
    return "".join(out)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunks", [[1], [2, 1, 3], [5]])
def test_streamed_text_equals_the_full_decode_byte_level_bpe(text: str, chunks: list[int]) -> None:
    tokenizer = _smollm2()
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert _stream(tokenizer, ids, chunks) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_full_decode_sentencepiece_style(tmp_path: Path, text: str) -> None:
    tokenizer = _metaspace(tmp_path)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 5
    assert _stream(tokenizer, ids, [1]) == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_split_character_is_held_back_until_complete() -> None:
    tokenizer = _smollm2()
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    pieces = [tokenizer.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any(p.endswith("\ufffd") for p in pieces), "the emoji must span several byte tokens"
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.finish() == "ok 🎉"


def test_special_tokens_are_skipped_as_in_the_full_decode() -> None:
    tokenizer = _smollm2()
    ids = tokenizer.encode("Hello there", add_special_tokens=False)
    ids = [*ids[:1], tokenizer.eos_token_id, *ids[1:]]
    assert _stream(tokenizer, ids, [1]) == tokenizer.decode(ids, skip_special_tokens=True) == "Hello there"


def test_random_token_sequences_stream_to_the_full_decode() -> None:
    """Model output need not be sensible text: any token sequence streams to its full decode."""
    tokenizer = _smollm2()
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        assert _stream(tokenizer, ids, [1]) == tokenizer.decode(ids, skip_special_tokens=True)
