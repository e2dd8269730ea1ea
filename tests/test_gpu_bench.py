"""benchmarks/gpu.py in its --tiny form: the same code as on a GPU, on CPU in seconds.

Run in a subprocess with faiss, bm25s, gradio, fastapi and httpx made unimportable: the GPU box that runs
the real benchmark has none of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("faiss", "bm25s", "gradio", "fastapi", "httpx")


def _run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "gpu.json"
    code = (
        "import sys\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        "from benchmarks.gpu import main\n"
        f"main(['--tiny', '--json-out', {str(out)!r}, *{list(args)!r}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_tiny_run_measures_product_and_baselines(tmp_path: Path) -> None:
    figures, stdout = _run(tmp_path, "--sections", "1,8,finetune")
    assert figures["device"]["bandwidth_gb_s"] > 0
    one, eight = figures["1.5b x1"], figures["1.5b x8"]
    for section in (one, eight):
        assert section["product_step"] == "eager"  # compiled only on CUDA
        assert section["product_tok_s"] > 0 and section["raw_eager_tok_s"] > 0
        assert 0 < section["product_ttft_p50_ms"] <= section["product_ttft_p95_ms"]
        assert math.isfinite(section["product_vs_eager"])
    assert one["raw_static_tok_s"] > 0 and math.isfinite(one["product_vs_raw_static"])
    assert "raw_static_tok_s" not in eight  # the 8-user section has no compiled baseline (GPU time)
    assert figures["1.5b"]["limit_1user_tok_s"] > 0
    # Every figure is printed as it comes, with the time since start.
    assert "PRODUCT decode tok/s after the first token" in stdout and "[" in stdout.splitlines()[0]
    assert "fine-tune" in stdout
    if "finetune" in figures:
        assert figures["finetune"]


def test_budget_skips_the_remaining_sections(tmp_path: Path) -> None:
    figures, stdout = _run(tmp_path, "--budget-s", "0", "--sections", "1,8b")
    assert figures["skipped"] == ["1", "8b"]
    assert "1.5b x1" not in figures
    assert "section 1 skipped" in stdout
