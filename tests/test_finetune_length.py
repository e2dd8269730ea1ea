"""Fine-tuning that finishes (#15 item 7): one long FAQ answer never blocks a run.

Examples longer than ``finetune.max_length`` grow the budget up to the model's context; the few
longer than that are skipped and listed in the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The fixtures (tiny, toy_model_dir, one_thread) are test_finetune's.
from test_finetune import ft_settings, one_thread, tiny, toy_entries, toy_model_dir  # noqa: F401

from chatbot.settings import Settings
from finetune.data import QAPair, build_examples, fit_examples
from knowledge_base.entry import FAQEntry


def test_a_long_example_grows_the_budget_instead_of_failing(tiny: tuple[Any, Any]) -> None:  # noqa: F811
    tokenizer, _ = tiny
    pairs = [QAPair("Short?", "Yes.", "a", "faq:1"), QAPair("Long?", "word " * 150, "b", "faq:2")]
    fitted = fit_examples(build_examples(pairs, layout="closed"), tokenizer, 64, limit=2048)
    assert len(fitted.examples) == 2 and not fitted.skipped
    assert 64 < fitted.max_length == max(len(e.input_ids) for e in fitted.examples)
    assert fitted.stats(64)["max_length_used"] == fitted.max_length


def test_examples_longer_than_the_model_context_are_skipped_and_listed(tiny: tuple[Any, Any]) -> None:  # noqa: F811
    tokenizer, _ = tiny
    pairs = [QAPair("Short?", "Yes.", "a", "faq:1"), QAPair("Huge?", "word " * 900, "b", "faq:2")]
    fitted = fit_examples(build_examples(pairs, layout="closed"), tokenizer, 64, limit=256)
    assert [e.source for e in fitted.examples] == ["faq:1"]
    assert fitted.max_length == 256
    (skipped,) = fitted.skipped
    assert skipped["source"] == "faq:2" and skipped["tokens"] > 256


def test_from_kb_finishes_with_an_entry_longer_than_max_length(settings: Settings, toy_model_dir: Path) -> None:  # noqa: F811
    from finetune.train import FinetuneRequest, run_finetune

    entries = [*toy_entries(), FAQEntry(id="long", question="Tell me everything?", answer="detail " * 120)]
    s = ft_settings(settings, max_length=48).replace(model={"model": str(toy_model_dir), "device": "cpu"})
    result = run_finetune(
        s,
        FinetuneRequest(output="fits", from_kb=True, max_steps=1, evaluate=False),
        entries=entries,
        progress_bar=False,
    )
    length = result.report["data"]["length"]
    assert result.report["training"]["steps"] == 1
    assert length["max_length"] == 48 and length["max_length_used"] > 48
    assert length["skipped_too_long"] == []
