"""benchmarks/gpu_finetune.py on CPU with a tiny config: the code the GPU run uses, in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_compare_finetune_runs_both_loops_on_a_tiny_config(tiny_model_dir: Path) -> None:
    from benchmarks.gpu_finetune import BATCH, compare_finetune

    result = compare_finetune(tiny_model_dir / "config.json", tiny_model_dir, device="cpu", seconds=0.5, tiny=True)
    assert result["recipe_tok_s"] > 0 and result["plain_tok_s"] > 0
    assert result["speedup"] == pytest.approx(result["recipe_tok_s"] / result["plain_tok_s"])
    assert result["loss_mode"] == "shared-prefix"  # float32 on a CPU: the fastest mode agrees
    assert result["recipe_steps"] >= 1 and result["plain_steps"] >= 1
    # Random batches of a mix of closed-book and retrieval prompts are padded a lot; the recipe's are not.
    assert 0.1 < result["plain_padding"] < 0.9
    assert result["recipe_peak_gib"] is None and result["memory_ratio"] is None  # no CUDA memory on a CPU
    assert result["batch"] == BATCH == result["micro_batch_size"] * result["grad_accum_steps"]
    assert result["dtype"] == "float32" and result["model_type"] == "llama" and result["examples"] > 100


def test_the_module_needs_no_search_or_web_packages(tmp_path: Path) -> None:
    """The GPU machines lack faiss, bm25s, gradio and fastapi: importing the benchmark must not need them."""
    code = (
        "import sys\n"
        "for name in ('faiss', 'bm25s', 'gradio', 'fastapi'):\n"
        "    sys.modules[name] = None  # any import of these now raises ImportError\n"
        "import benchmarks.gpu_finetune as b\n"
        "import finetune.train, finetune.loss, finetune.lora, finetune.data\n"
        "b.synthetic_entries(3)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
