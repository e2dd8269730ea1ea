"""Micro-batches and the loss over their answer tokens: three ways to compute it, and the check that picks one.

:func:`collate` pads a micro-batch and works out, on the host, everything the loss needs to know
about it: which positions predict an answer token (as index tensors, so the device never has to
report a count back in the middle of a forward pass), and how many leading tokens every row shares.
:func:`answer_loss` computes the summed cross-entropy over the answer tokens in one of three modes
(full forward, sliced output head, shared system-prompt prefix) and :func:`choose_loss_mode` picks
the fastest one that gives the model the same loss and gradients as its own forward.

Precision (:func:`compute_dtype`, :func:`autocast`, :func:`agreement_tolerance`): the frozen base
weights set the compute dtype (bfloat16 or float16 on a GPU, float32 on a CPU), peft keeps the LoRA
weights in float32, and autocast runs the matmuls in the compute dtype. The agreement check runs
under the very autocast training uses and compares gradients norm-wise, with a tolerance scaled to
that dtype's rounding: an element-wise float32 tolerance rejects every mode under bfloat16 (two
correct bfloat16 computations of one gradient differ by ~1e-2 relative) and left the recipe on its
slowest mode on GPUs.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from finetune.data import TokenizedExample

if TYPE_CHECKING:
    import torch

__all__ = [
    "CE_CHUNK_ROWS",
    "MIN_SHARED_PREFIX",
    "Batch",
    "LossMode",
    "agreement_tolerance",
    "answer_loss",
    "autocast",
    "choose_loss_mode",
    "collate",
    "compute_dtype",
    "gradient_disagreement",
    "shared_prefix_length",
]

log = logging.getLogger(__name__)

LossMode = Literal["full", "sliced", "shared-prefix"]
#: Rows of the output head computed at once; more answer positions than this use chunked cross-entropy.
CE_CHUNK_ROWS = 1024
#: Shorter common prefixes are not worth a separate forward pass.
MIN_SHARED_PREFIX = 16
#: Fast modes, fastest first on a CPU (measured in benchmarks/finetune.py); on a GPU they are timed.
FAST_MODES: tuple[LossMode, ...] = ("shared-prefix", "sliced")


# --------------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One right-padded micro-batch; ``labels`` are -100 outside the answers (masked by position)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    n_tokens: int
    """Real (non-padding) tokens."""
    n_targets: int
    """Answer tokens the loss is computed on (incl. the end-of-turn token)."""
    target_rows: torch.Tensor
    """Row of each answer token (``n_targets`` of them, row-major order)."""
    target_positions: torch.Tensor
    """Position whose hidden state predicts that answer token (the token's own position - 1)."""
    target_ids: torch.Tensor
    """The answer tokens themselves."""
    shared_prefix: int = 0
    """Leading tokens every row has in common, all inside every prompt (0 when too few to bother)."""


def shared_prefix_length(examples: Sequence[TokenizedExample]) -> int:
    """Length of the token prefix every example starts with, inside every example's prompt.

    Chat examples all start with the same system prompt (~75 SmolLM2 tokens): computing it once per
    micro-batch instead of once per example saves that much of every example's forward and backward.
    The hidden state at ``prompt_len - 1`` predicts the first answer token, so it stays outside.
    """
    if len(examples) < 2 or any(ex.n_answer_tokens == 0 for ex in examples):
        return 0
    limit = min(ex.prompt_len for ex in examples) - 1
    prefix = 0
    for column in zip(*(ex.input_ids[:limit] for ex in examples), strict=False):
        if any(token != column[0] for token in column):
            break
        prefix += 1
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def collate(examples: Sequence[TokenizedExample], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-pad to the longest example of the batch (not to max_length).

    The answer positions are found here, on the host, and travel as index tensors: selecting them on
    the device with a boolean mask would make every micro-batch wait for the GPU to report how many
    there are. On CUDA the tensors are copied from pinned memory without blocking the host.
    """
    import torch

    width = max(len(ex) for ex in examples)
    ids = torch.tensor([list(ex.input_ids) + [pad_id] * (width - len(ex)) for ex in examples], dtype=torch.long)
    columns = torch.arange(width)
    mask = columns < torch.tensor([len(ex) for ex in examples])[:, None]
    answer = mask & (columns >= torch.tensor([ex.prompt_len for ex in examples])[:, None])
    labels = torch.where(answer, ids, torch.full_like(ids, -100))
    # Position t predicts token t + 1; nonzero() is row-major, the order a boolean mask selects in.
    rows, positions = answer[:, 1:].nonzero(as_tuple=True)
    target_ids = ids[rows, positions + 1]
    device = torch.device(device)
    pinned = device.type == "cuda"

    def move(t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device)

    return Batch(
        move(ids),
        move(mask.long()),
        move(labels),
        n_tokens=sum(len(ex) for ex in examples),
        n_targets=sum(ex.n_answer_tokens for ex in examples),
        target_rows=move(rows),
        target_positions=move(positions),
        target_ids=move(target_ids),
        shared_prefix=shared_prefix_length(examples),
    )


# --------------------------------------------------------------------------------------------------
# Precision


def compute_dtype(model: Any) -> torch.dtype:
    """The dtype the model computes in: that of its frozen (base) weights, else of its trainable ones."""
    params = list(model.parameters())
    return next((p.dtype for p in params if not p.requires_grad), params[0].dtype)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """bf16/fp16 autocast when the base is in half precision; nothing in float32.

    The base runs in half precision while peft keeps the LoRA weights in float32: autocast runs both
    in the base's dtype (on a CPU too, where it only applies when the model was loaded in half
    precision on purpose; the default there is float32).
    """
    import torch

    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def agreement_tolerance(dtype: torch.dtype) -> float:
    """Largest relative disagreement (see :func:`gradient_disagreement`) two correct loss modes may show.

    32 units of rounding of the compute dtype, and never under 1e-3: float32 1e-3, float16 1.6e-2,
    bfloat16 0.125. Measured under CPU autocast (tests/test_finetune.py, docs/finetuning.md): correct
    modes differ by up to ~3e-2 in bfloat16 (SmolLM2-135M, 30 layers) and ~1e-6 in float32; a mode
    that is wrong (gradients cut at the shared prefix, positions restarted after it, targets shifted
    by one) differs by 0.4 or more in every dtype.
    """
    import torch

    return max(1e-3, 32 * torch.finfo(dtype).eps / 2)


def gradient_disagreement(
    loss: torch.Tensor, grads: Sequence[torch.Tensor], ref_loss: torch.Tensor, ref_grads: Sequence[torch.Tensor]
) -> float:
    """How far a loss and its gradients are from a reference: the largest relative error of the
    loss and of each gradient tensor, norm-wise.

    Norm-wise, because rounding noise in half precision swamps the small elements of a gradient
    (an element-wise check fails on those however right the computation is), while a wrong
    computation changes whole tensors. A tensor whose reference gradient is tiny (the LoRA A
    weights get none while B is still zero) is measured against 1e-3 of the largest one instead.
    """
    import torch

    if not bool(torch.isfinite(loss)) or not all(bool(torch.isfinite(g).all()) for g in grads):
        return math.inf
    worst = float((loss - ref_loss).abs() / ref_loss.abs().clamp_min(1e-12))
    norms = [float(torch.linalg.vector_norm(r.float())) for r in ref_grads]
    floor = 1e-3 * max(norms, default=0.0) + 1e-30
    for g, r, norm in zip(grads, ref_grads, norms, strict=True):
        error = float(torch.linalg.vector_norm(g.float() - r.float()))
        worst = max(worst, error / max(norm, floor))
    return worst


# --------------------------------------------------------------------------------------------------
# Loss


def _causal_lm(model: Any) -> Any:
    """The transformers model inside a PeftModel (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _decoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """(decoder, output head) when logits are exactly ``head(decoder(...).last_hidden_state)``.

    True for the usual ``*ForCausalLM`` classes; models that scale or soft-cap their logits
    (Gemma 2, Cohere, Granite) take the plain forward instead.
    """
    base = _causal_lm(model)
    config = getattr(base, "config", None)
    if not type(base).__name__.endswith("ForCausalLM") or config is None:
        return None
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return None
    decoder = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings()
    if decoder is None or decoder is base or head is None:
        return None
    return decoder, head


def _checkpointing(decoder: Any) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in decoder.modules())


def _cache_keyword(decoder: Any) -> str:
    """The decoder's name for the KV-cache argument: ``cache`` from transformers 5.25 on (where
    ``past_key_values=`` warns and goes away in 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(type(decoder).forward).parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    """The cache a decoder returned (``output.cache`` from transformers 5.25 on, where reading
    ``output.past_key_values`` warns)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def answer_loss(model: Any, batch: Batch, *, mode: LossMode = "sliced") -> torch.Tensor:
    """Summed cross-entropy over the answer tokens of a right-padded ``batch`` (see :func:`collate`);
    divide by ``batch.n_targets`` for the mean.

    ``mode``:

    - ``"full"``: the model's own forward, logits over the whole vocabulary at every position;
    - ``"sliced"``: run the decoder, keep the hidden states of the positions that predict an answer
      token and apply the output head to those only (in chunks, recomputed in the backward pass,
      when there are many), so float32 logits over the vocabulary exist for the answers alone;
    - ``"shared-prefix"``: as ``"sliced"``, and the prefix all rows share (the system prompt) runs
      once for the batch, its keys and values reused by every row through the KV cache, gradients
      included (not with gradient checkpointing, which turns the cache off).

    Nothing here waits for the device: the positions and the prefix come with the batch.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    rows, positions, target_ids = batch.target_rows, batch.target_positions, batch.target_ids
    parts = _decoder_and_head(model) if mode != "full" else None
    if parts is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return F.cross_entropy(logits[rows, positions].float(), target_ids, reduction="sum")
    decoder, head = parts
    prefix = batch.shared_prefix if mode == "shared-prefix" and not _checkpointing(decoder) else 0
    # Rows are right-padded, so the causal mask alone is exact for every real token (padding only
    # follows them); without a padding mask SDPA can take its fused causal kernel.
    if prefix:
        shared = decoder(input_ids=batch.input_ids[:1, :prefix], use_cache=True)
        cache = _returned_cache(shared)
        cache.batch_repeat_interleave(batch.input_ids.shape[0])
        out = decoder(input_ids=batch.input_ids[:, prefix:], use_cache=True, **{_cache_keyword(decoder): cache})
        positions = positions - prefix  # out covers positions prefix..T-1
    else:
        out = decoder(input_ids=batch.input_ids, use_cache=False)
    selected = out.last_hidden_state[rows, positions]

    def chunk_loss(hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(hidden).float(), ids, reduction="sum")

    if selected.shape[0] <= CE_CHUNK_ROWS:
        return chunk_loss(selected, target_ids)
    total = selected.new_zeros((), dtype=torch.float32)
    for hidden, ids in zip(selected.split(CE_CHUNK_ROWS), target_ids.split(CE_CHUNK_ROWS), strict=True):
        total = total + checkpoint(chunk_loss, hidden, ids, use_reentrant=False)
    return total


# --------------------------------------------------------------------------------------------------
# Choosing the mode


def choose_loss_mode(model: Any, batch: Batch, *, timing_batch: Batch | None = None) -> LossMode:
    """The fastest loss mode that gives this model the same loss *and gradients* as its own forward.

    Checked once per run on a small ``batch`` (dropout off), under the autocast training uses, with
    :func:`agreement_tolerance` of the compute dtype: a model whose logits are not a plain head over
    the decoder, or whose cache does not carry gradients, falls back to a slower mode.

    Which agreeing mode is fastest depends on the device: on a CPU the shared prefix always wins
    (compute-bound: it saves the prefix's FLOPs of every row but one). On a GPU a small model is
    bound by kernel launches instead, and the prefix's extra forward pass can cost more than it
    saves, so with a ``timing_batch`` (a full training micro-batch) on a GPU the agreeing modes are
    timed on it, forward and backward, and the faster one is taken.
    """
    import torch

    if _decoder_and_head(model) is None:
        return "full"
    params = [p for p in model.parameters() if p.requires_grad]
    device, dtype = params[0].device, compute_dtype(model)
    tolerance = agreement_tolerance(dtype)
    was_training = model.training
    model.eval()

    def run(mode: LossMode, on: Batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = answer_loss(model, on, mode=mode)
        loss.backward()
        return loss.detach().float(), [
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params
        ]

    race = timing_batch is not None and device.type != "cpu"
    try:
        ref_loss, ref_grads = run("full", batch)
        agreeing: list[LossMode] = []
        for mode in FAST_MODES:
            loss, grads = run(mode, batch)
            error = gradient_disagreement(loss, grads, ref_loss, ref_grads)
            if error <= tolerance:
                agreeing.append(mode)
                if not race:
                    break
            else:
                log.warning(
                    "loss mode %s disagrees with the model's forward here (relative error %.3g > %.3g for %s); "
                    "trying a slower one",
                    mode,
                    error,
                    tolerance,
                    str(dtype).replace("torch.", ""),
                )
        if not agreeing:
            return "full"
        if race and len(agreeing) > 1:
            assert timing_batch is not None
            return _fastest(model, timing_batch, agreeing, run)
        return agreeing[0]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def _fastest(model: Any, batch: Batch, modes: Sequence[LossMode], run: Any) -> LossMode:
    """The mode whose forward + backward on ``batch`` takes least time (one warm-up pass, then the
    best of two, each bracketed by a device synchronisation); ties within 3% go to the earlier mode."""
    import torch

    device = next(p for p in model.parameters() if p.requires_grad).device
    accelerator = getattr(torch, device.type)
    seconds: dict[LossMode, float] = {}
    for mode in modes:
        run(mode, batch)  # warm-up: kernel selection, allocator growth
        best = math.inf
        for _ in range(2):
            accelerator.synchronize(device)
            start = time.perf_counter()
            run(mode, batch)
            accelerator.synchronize(device)
            best = min(best, time.perf_counter() - start)
        seconds[mode] = best
    fastest = min(modes, key=lambda m: seconds[m])
    chosen = next(m for m in modes if seconds[m] <= seconds[fastest] * 1.03)
    log.info("loss modes timed on a micro-batch: %s; using %s", _format_times(seconds), chosen)
    return chosen


def _format_times(seconds: dict[LossMode, float]) -> str:
    return ", ".join(f"{mode} {1000 * s:.1f} ms" for mode, s in seconds.items())
