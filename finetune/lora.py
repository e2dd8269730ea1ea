"""LoRA through peft, as peft ships it: configuration, adapter files with metadata, and merging.

Nothing here re-implements LoRA. :func:`lora_config` picks the modules to adapt from the model's
architecture (overridable with ``finetune.target_modules``), :func:`apply_lora` wraps the model with
``peft.get_peft_model``, :func:`save_adapter` writes peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained`` and by vLLM's
``--enable-lora``) plus ``supportbot_adapter.json`` (base model, dataset hash, settings, metrics,
date), and :func:`merge_adapter` folds an adapter into a standalone model with peft's
``merge_and_unload(safe_merge=True)``, which refuses weights that turned NaN.

``finetune.target_modules`` accepts:

- ``""`` or ``"attention"``: the attention projections of the architecture (q/k/v/o for Llama,
  Mistral, Qwen, SmolLM...; ``c_attn``/``c_proj`` for GPT-2; ``query_key_value`` for GPT-NeoX);
  every Linear layer but the output head for architectures not in the table;
- ``"attention+mlp"``: the above plus the MLP projections (``gate_proj``/``up_proj``/``down_proj``);
- ``"all-linear"``: every Linear layer but the output head (peft's own shortcut);
- a comma-separated list of module names, checked against the model.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatbot.adapters import METADATA_FILE
from chatbot.settings import FinetuneSettings
from knowledge_base.errors import SupportBotError

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "ATTENTION_MODULES",
    "MLP_MODULES",
    "LoraSetupError",
    "MergeError",
    "adapter_metadata",
    "apply_lora",
    "linear_module_names",
    "load_adapter",
    "lora_config",
    "merge_adapter",
    "read_metadata",
    "replace_dir",
    "resolve_target_modules",
    "save_adapter",
]

_LLAMA_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: Attention projections per ``config.model_type``.
ATTENTION_MODULES: dict[str, list[str]] = {
    **{
        name: _LLAMA_ATTENTION
        for name in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "smollm3",
            "granite",
            "starcoder2",
        )
    },
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "falcon": ["query_key_value", "dense"],
}
#: MLP projections added by ``"attention+mlp"``.
MLP_MODULES: dict[str, list[str]] = {
    **{
        name: ["gate_proj", "up_proj", "down_proj"]
        for name, mods in ATTENTION_MODULES.items()
        if mods is _LLAMA_ATTENTION
    },
    "phi3": ["gate_up_proj", "down_proj"],
    "gpt2": ["c_fc"],
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
}


class LoraSetupError(SupportBotError):
    """LoRA settings that do not fit the model (e.g. target modules it does not have)."""


class MergeError(SupportBotError):
    """An adapter that cannot be merged into its base model."""


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of Linear/Conv1D layers, without the output head (what LoRA can adapt)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head and name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names - {"lm_head"})


def resolve_target_modules(model: torch.nn.Module, spec: str = "") -> list[str] | str:
    """Module names for ``LoraConfig.target_modules`` (see the module docstring for ``spec``)."""
    spec = spec.strip()
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    available = linear_module_names(model)
    if spec == "all-linear":
        return "all-linear"
    if spec in ("", "attention", "attention+mlp"):
        names = list(ATTENTION_MODULES.get(model_type, []))
        if spec == "attention+mlp":
            names += MLP_MODULES.get(model_type, [])
        names = [n for n in names if n in available]
        return names or available
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise LoraSetupError(
            f"finetune.target_modules names {', '.join(map(repr, unknown))}, which this {model_type or 'model'} "
            "does not have",
            fix=f"use some of: {', '.join(available)} (or leave it empty to detect them)",
        )
    return names


def lora_config(model: torch.nn.Module, settings: FinetuneSettings, *, inference: bool = False) -> LoraConfig:
    """peft's LoraConfig for ``model`` from the fine-tune settings."""
    from peft import LoraConfig

    targets = resolve_target_modules(model, settings.target_modules)
    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=inference,
        # GPT-2 stores its projections transposed (Conv1D); peft needs to be told.
        fan_in_fan_out=model_type == "gpt2",
    )


def apply_lora(model: PreTrainedModel, settings: FinetuneSettings) -> PeftModel:
    """Wrap ``model`` with fresh LoRA layers (base weights frozen), ready to train."""
    from peft import get_peft_model

    if settings.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the base is frozen).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    config = lora_config(model, settings)
    with warnings.catch_warnings():
        # PITFALLS #15: peft 0.21 calls a transformers-5 deprecated property; harmless.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


def load_adapter(model: PreTrainedModel, folder: Path | str, *, trainable: bool = False) -> PeftModel:
    """``PeftModel.from_pretrained`` with a readable error when the folder holds no adapter."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise SupportBotError(
            f"no LoRA adapter in {folder} (adapter_config.json is missing)",
            fix="see `supportbot adapters list` for the adapters there are",
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return PeftModel.from_pretrained(model, str(folder), is_trainable=trainable)


def replace_dir(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target``, replacing what was there.

    Directories cannot be swapped atomically; the old one is moved aside first, so at every moment
    ``target`` is either the complete old folder, absent for an instant, or the complete new one.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{dt.datetime.now().strftime('%H%M%S%f')}")
        target.rename(old)
    source.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def adapter_metadata(
    *,
    base_model: str,
    base_model_path: str,
    dataset_hash: str,
    settings: FinetuneSettings,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``supportbot_adapter.json`` record."""
    import peft
    import torch
    import transformers

    return {
        "format": 1,
        "base_model": base_model,
        "base_model_path": base_model_path,
        "dataset_hash": dataset_hash,
        "settings": asdict(settings),
        "metrics": dict(metrics or {}),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        **dict(extra or {}),
    }


def save_adapter(model: PeftModel, folder: Path | str, metadata: Mapping[str, Any]) -> Path:
    """Write the adapter in peft's format plus ``supportbot_adapter.json``; replaces ``folder`` whole.

    Written into a temporary folder beside ``folder`` and renamed into place, so the chat engine
    never sees half an adapter.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / METADATA_FILE).write_text(json.dumps(dict(metadata), indent=2, default=str) + "\n", encoding="utf-8")
        replace_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_metadata(folder: Path | str) -> dict[str, Any]:
    """The adapter's ``supportbot_adapter.json`` ({} when absent)."""
    file = Path(folder) / METADATA_FILE
    if not file.is_file():
        return {}
    data = json.loads(file.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def merge_adapter(
    base: PreTrainedModel,
    adapter_dir: Path | str,
    output_dir: Path | str,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Fold the adapter into ``base`` (peft's safe merge: NaN check) and save a standalone model.

    ``base`` is modified in place (the merged weights replace its own); the output folder loads with
    ``AutoModelForCausalLM.from_pretrained`` and needs neither peft nor the adapter.
    """
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    peft_model = load_adapter(base, adapter_dir)
    try:
        merged = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as exc:
        raise MergeError(
            f"merging {adapter_dir.name} failed: {exc}",
            fix="the adapter's weights are broken (NaN): retrain it, e.g. with a lower --lr",
        ) from exc
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        info = {"merged_from": str(adapter_dir), "adapter": read_metadata(adapter_dir)}
        (tmp / "supportbot_merged.json").write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")
        replace_dir(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
