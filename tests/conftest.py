"""Shared fixtures: a fake embedder and a tiny random causal LM, so the unit suite needs no real model.

Tests marked ``slow`` load the bundled models (MiniLM, SmolLM2); everything else runs in seconds.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from chatbot.settings import Settings, load_settings
from knowledge_base.embeddings import Embedder

DEMO_DIR = Path(__file__).resolve().parents[1] / "knowledge_base" / "demo"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class HashingEmbedder(Embedder):
    """Deterministic bag-of-words + character-trigram hashing: similar wording, similar vectors.

    Good enough for tests of ranking and fusion logic, with no model to load.
    """

    name = "test:hashing"

    def __init__(self, dim: int = 256) -> None:
        self._dim = dim
        self.calls = 0
        self.texts_embedded = 0

    def embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.texts_embedded += len(texts)
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            grams = words + [w[i : i + 3] for w in words for i in range(max(len(w) - 2, 1))]
            for gram in grams:
                h = int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=4).digest(), "little")
                out[row, h % self._dim] += 1.0 if gram in words else 0.5
            norm = np.linalg.norm(out[row])
            out[row] = out[row] / norm if norm else out[row]
            if not norm:
                out[row, 0] = 1.0
        return out


class GatedEmbedder(HashingEmbedder):
    """The fake embedder, holding the background fill (its thread) until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.waiting = threading.Event(), threading.Event()

    def embed_batch(self, texts):
        if threading.current_thread().name == "kb-answers":
            self.waiting.set()
            assert self.gate.wait(10), "the test never opened the gate"
        return super().embed_batch(texts)


@pytest.fixture
def embedder() -> HashingEmbedder:
    return HashingEmbedder()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Defaults with the data dir in a temp folder; the real environment is ignored. Generation is
    on (the default "auto" turns it off on a CPU): the unit tests exercise the generated mode with
    fake or tiny models."""
    return load_settings(env={}, overrides={"data_dir": str(tmp_path / "data"), "policy.generation": "on"})


def _build_tiny_model(folder: Path) -> Path:
    """A 2-layer Llama with a small BPE tokenizer trained on the demo FAQ, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [p.read_text(encoding="utf-8") for p in sorted(DEMO_DIR.glob("*")) if p.suffix in (".csv", ".jsonl")]
    corpus += ["FAQ entries: Customer question: I don't know. The quick brown fox jumps over the lazy dog."] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=1024,
    )
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny random Llama-style model (seconds to build, loads like any local model)."""
    return _build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_settings(settings: Settings, tiny_model_dir: Path) -> Settings:
    """Settings whose model is the tiny random one, on CPU, greedy, short answers."""
    return settings.replace(model={"model": str(tiny_model_dir), "device": "cpu", "max_new_tokens": 12})
