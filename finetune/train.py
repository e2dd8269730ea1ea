"""The LoRA training loop (:func:`fit`) and the recipe around it (:func:`run_finetune`).

:func:`fit` is a plain loop in the manner of litgpt's ``fit``: no HF Trainer. What makes it fast and
small on a CPU, measured in ``benchmarks/finetune.py``:

- **dynamic padding, grouped by length**: each epoch shuffles the examples with the seed, sorts them
  by length within buckets of 50 micro-batches and pads each micro-batch to its own longest example
  (not to ``max_length``), so almost no compute goes to padding;
- **loss on answer positions only**: the decoder's hidden states are sliced to the positions whose
  next token is an answer token *before* the output head, so the 49k-vocabulary logits exist for
  ~60 positions per example instead of all of them (cross-entropy in chunks when there are many);
- **the shared prefix once per micro-batch**: every example starts with the same system prompt, so
  it runs once and its keys/values serve every row through the KV cache (gradients flow through
  it); a one-time check per run compares loss and gradients with the model's own forward and falls
  back to a slower mode if they differ (see :mod:`finetune.loss`);
- micro-batches with gradient accumulation (``micro_batch_size`` × ``grad_accum_steps`` examples a
  step; the loss is the mean over all answer tokens of the step), AdamW, linear warmup then cosine
  decay (fitted to the steps a time limit allows), gradient clipping at 1.0;
- precision follows the loaded base (`chatbot.models.resolve_dtype`): float32 on a CPU (bf16 is far
  slower on CPUs without native support), bf16 autocast on GPUs that support it, else fp16 autocast
  with a loss scaler (``torch.amp.GradScaler``); optional gradient checkpointing; a seed for the data
  order, LoRA init and dropout.

On a GPU, besides: the agreeing fast loss modes are timed on a real micro-batch and the faster one
is used (small models there are bound by kernel launches, not FLOPs); the host never waits for the
device inside a step (batches come from pinned memory, answer positions as index tensors, the loss
is summed on the device and read once per optimizer step); AdamW runs fused.

Checkpoints (every ``checkpoint_every`` steps and on Ctrl-C) hold the adapter in peft format, the
optimizer, scheduler and RNG states, the step and the data position, written to a temporary folder
and renamed into ``<run>/checkpoints/step-NNNNNN`` with a ``latest`` pointer written atomically.
``resume=True`` restores all of it, so a resumed run continues at the same step with the same next
micro-batch and reaches the same loss as an uninterrupted one. Ctrl-C (``KeyboardInterrupt``, also
when raised by ``on_progress``) saves a checkpoint of the last finished step and raises
:class:`TrainingInterrupted`.

Several GPUs: the stock launchers (``torchrun --nproc_per_node=N`` or ``accelerate launch``) start one
process per GPU; :func:`init_distributed` joins their process group, each process runs its share of
a step's micro-batches and the LoRA gradients are summed across processes (docs/finetuning.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatbot.settings import FinetuneSettings, Settings
from finetune.data import TokenizedExample
from finetune.lora import replace_dir
from finetune.loss import Batch, answer_loss, autocast, choose_loss_mode, collate, compute_dtype
from knowledge_base.atomic import atomic_write_text
from knowledge_base.errors import SupportBotError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Batch",
    "FinetuneRequest",
    "FinetuneResult",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "answer_loss",
    "choose_loss_mode",
    "collate",
    "fit",
    "latest_checkpoint",
    "length_grouped_batches",
    "run_finetune",
]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]
MAX_GRAD_NORM = 1.0
BUCKET_BATCHES = 50
KEEP_CHECKPOINTS = 2
RUNS_DIRNAME = "finetune"


class TrainingError(SupportBotError):
    """A training run that cannot start or continue (e.g. resuming with different data)."""


class TrainingInterrupted(SupportBotError):
    """Training stopped by Ctrl-C after saving a checkpoint; continue with ``resume=True``."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None) -> None:
        where = f"checkpoint saved in {checkpoint}" if checkpoint else "no step had finished, nothing saved"
        super().__init__(
            f"training interrupted at step {step}/{total_steps}; {where}",
            fix="run the same command again with --resume to continue from there",
        )
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------------------------------
# Batches


def length_grouped_batches(
    lengths: Sequence[int], micro_batch_size: int, seed: int, *, bucket_batches: int = BUCKET_BATCHES
) -> list[list[int]]:
    """Micro-batches of indices for one epoch: shuffled, then sorted by length within buckets.

    Deterministic for a given seed (the epoch number is folded into it by the caller), which is
    what lets a resumed run find its data position again.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    bucket = micro_batch_size * max(1, bucket_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: -lengths[i])
        batches += [chunk[j : j + micro_batch_size] for j in range(0, len(chunk), micro_batch_size)]
    rng.shuffle(batches)
    return batches


# --------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class TrainState:
    """What a checkpoint needs besides the weights and optimizer: where the run is."""

    step: int = 0
    micro: int = 0
    """Global index of the next micro-batch (epoch = micro // micro-batches per epoch)."""
    tokens: int = 0
    target_tokens: int = 0
    elapsed_s: float = 0.0
    losses: list[list[float]] = field(default_factory=list)
    """[step, loss] per optimizer step."""
    eval_losses: list[list[float]] = field(default_factory=list)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    folder = Path(run_dir) / "checkpoints"
    pointer = folder / "latest"
    if pointer.is_file():
        candidate = folder / pointer.read_text(encoding="utf-8").strip()
        if (candidate / "trainer_state.pt").is_file():
            return candidate
    done = sorted(p for p in folder.glob("step-*") if (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    run_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
    rng: dict[str, Any],
    guard: dict[str, Any],
    scaler: Any = None,
) -> Path:
    import torch

    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder))
    try:
        model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
                "state": dataclasses.asdict(state),
                "guard": guard,
                **({"scaler": scaler.state_dict()} if scaler is not None else {}),
            },
            tmp / "trainer_state.pt",
        )
        summary = {
            "step": state.step,
            "micro_batch": state.micro,
            "loss": state.losses[-1][1] if state.losses else None,
        }
        (tmp / "state.json").write_text(json.dumps({**summary, "guard": guard}, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(folder / "latest", name + "\n")
    for old in sorted(p for p in folder.glob("step-*") if p.name != name)[: -(KEEP_CHECKPOINTS - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return folder / name


def _load_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, guard: dict[str, Any], scaler: Any = None
) -> tuple[TrainState, dict[str, Any]]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    data = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
    saved = data.get("guard", {})
    changed = [k for k in guard if saved.get(k) != guard[k]]
    if changed:
        detail = "; ".join(f"{k}: {saved.get(k)!r} then, {guard[k]!r} now" for k in changed)
        raise TrainingError(
            f"cannot resume from {path}: the run changed ({detail})",
            fix="resume with the same data and settings, or start over with --restart",
        )
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    if scaler is not None and "scaler" in data:
        scaler.load_state_dict(data["scaler"])
    state = TrainState(**data["state"])
    return state, data["rng"]


def _all_reduce_step(params: list[Any], loss: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """Sum the LoRA gradients, the step loss and the token count over the process group."""
    import torch
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
    totals = torch.stack([loss.double(), loss.new_tensor(float(tokens), dtype=torch.float64)])
    dist.all_reduce(totals)
    return totals[0], int(totals[1])


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C during an optimizer update, so a checkpoint never sees half an update."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024


# --------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    final_loss: float
    """Mean loss of the last 10 steps (or fewer)."""
    last_loss: float
    losses: list[list[float]]
    eval_losses: list[list[float]]
    tokens: int
    target_tokens: int
    seconds: float
    """Training time over all sessions (a resumed run counts the time before the interruption too)."""
    tokens_per_s: float
    """Real (non-padding) tokens per second of this session."""
    resumed_from: int
    checkpoint: Path | None
    peak_rss_mb: float
    loss_mode: str = "sliced"

    @property
    def stopped_early(self) -> bool:
        """True when ``time_limit_s`` ended the run before ``total_steps`` (Ctrl-C raises instead)."""
        return self.steps < self.total_steps

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["checkpoint"] = str(self.checkpoint) if self.checkpoint else None
        out["stopped_early"] = self.stopped_early
        return out


class WarmupCosine:
    """The learning-rate factor of step ``step``: linear warmup over ``warmup_ratio`` of the
    horizon, then a cosine down to 0 at ``horizon`` steps (``total_steps`` unless shortened).

    A time-limited run shortens the horizon to the steps that fit in the time left (`fit_to`), so
    the rate has decayed when time runs out: a cosine cut off midway leaves the adapter at a high
    rate's noisy last steps. A callable object rather than a closure because LambdaLR saves an
    object's attributes in its state: a resumed run keeps the shortened horizon."""

    def __init__(self, total_steps: int, warmup_ratio: float) -> None:
        self.total_steps, self.warmup_ratio = total_steps, warmup_ratio
        self.horizon = total_steps

    def __call__(self, step: int) -> float:
        warmup = int(self.warmup_ratio * self.horizon)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, self.horizon - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def fit_to(self, steps_done: int, seconds_left: float, seconds_per_step: float) -> None:
        """Make the horizon the steps that fit: done + what the time left allows at this pace."""
        more = int(max(seconds_left, 0.0) / max(seconds_per_step, 1e-9))
        self.horizon = max(steps_done, min(self.total_steps, steps_done + more))


def total_steps_for(
    n_examples: int, settings: FinetuneSettings, max_steps: int | None = None, *, world_size: int = 1
) -> int:
    """Optimizer steps of a run: ``epochs`` passes over the data, or ``max_steps`` when given."""
    if max_steps:
        return max_steps
    per_epoch = math.ceil(n_examples / settings.micro_batch_size)
    per_step = settings.grad_accum_steps * world_size
    return max(1, math.ceil(math.ceil(settings.epochs * per_epoch) / per_step))


def init_distributed(world_size: int, local_rank: int) -> tuple[int, int]:
    """Join the process group that ``torchrun`` / ``accelerate launch`` set up; returns (world, rank).

    Called by the entry point (which reads the launcher's ``WORLD_SIZE``/``LOCAL_RANK``) before the
    model is loaded, so ``cuda`` means this process's GPU. One process: nothing to do.
    """
    import torch

    if world_size <= 1:
        return 1, 0
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_world_size(), dist.get_rank()


def _world() -> tuple[int, int]:
    """(world size, rank) of the data-parallel group, (1, 0) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def fit(
    model: Any,
    train: Sequence[TokenizedExample],
    settings: FinetuneSettings,
    *,
    run_dir: Path,
    pad_id: int,
    resume: bool = False,
    max_steps: int | None = None,
    fingerprint: str = "",
    eval_fn: Callable[[], float] | None = None,
    eval_every: int = 0,
    on_progress: ProgressCallback | None = None,
    progress_bar: bool = True,
    time_limit_s: float | None = None,
) -> TrainResult:
    """Train the LoRA weights of ``model`` (a PeftModel) on ``train``; see the module docstring.

    ``fingerprint`` (the dataset hash) and the batch settings are stored in each checkpoint and
    checked on resume. ``eval_fn`` (e.g. the held-out loss) runs every ``eval_every`` steps.
    ``on_progress`` gets a dict after every step: step, total_steps, epoch, loss, lr, tokens (real
    tokens so far), tokens_per_s, elapsed_s, eta_s (and ``checkpoint`` when one was written);
    raising KeyboardInterrupt from it stops the run like Ctrl-C does (how a UI stops a run).
    ``time_limit_s`` ends the run before the first step that would take training past that many
    seconds (judged by the mean step so far; the result says ``stopped_early``); the learning-rate
    schedule is fitted to the steps the time allows (`WarmupCosine.fit_to`), so it has decayed by then.
    """
    import torch
    from tqdm.auto import tqdm

    if not train:
        raise TrainingError("no training examples", fix="add data (see `supportbot finetune --help`)")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("the model has no trainable parameters", fix="wrap it with finetune.lora.apply_lora first")
    device = params[0].device
    dtype = compute_dtype(model)
    # Data parallel (torchrun / accelerate launch): every process runs `accum` of the step's
    # accum x world micro-batches; the LoRA gradients (a few MB) are summed across processes.
    world, rank = _world()
    main = rank == 0

    mbs, accum = settings.micro_batch_size, settings.grad_accum_steps
    per_step = accum * world
    lengths = [len(ex) for ex in train]
    per_epoch = math.ceil(len(train) / mbs)
    total_steps = total_steps_for(len(train), settings, max_steps, world_size=world)
    # Fused on CUDA: one kernel updates every LoRA tensor (~200 of them) instead of a launch per op.
    on_cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        params,
        lr=settings.learning_rate,
        weight_decay=settings.weight_decay,
        fused=True if on_cuda else None,
        foreach=None if on_cuda else False,
    )
    # float16 gradients of the activations underflow without loss scaling (bf16 has float32's range).
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    schedule = WarmupCosine(total_steps, settings.warmup_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    guard = {
        "dataset_hash": fingerprint,
        "examples": len(train),
        "micro_batch_size": mbs,
        "grad_accum_steps": accum,
        "world_size": world,
        "seed": settings.seed,
        "rank": settings.rank,
        "target_modules": settings.target_modules,
    }

    state = TrainState()
    resumed_from = 0
    checkpoint_path: Path | None = None
    if resume:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise TrainingError(
                f"nothing to resume: no checkpoint in {run_dir / 'checkpoints'}",
                fix="start the run without --resume",
            )
        state, rng = _load_checkpoint(found, model, optimizer, scheduler, guard, scaler)
        _set_rng_state(rng)
        resumed_from, checkpoint_path = state.step, found
        log.info("resuming %s at step %d (micro-batch %d)", run_dir.name, state.step, state.micro)
    else:
        torch.manual_seed(settings.seed)

    plans: dict[int, list[list[int]]] = {}

    def micro_batch(index: int) -> list[int]:
        epoch = index // per_epoch
        if epoch not in plans:
            plans.clear()
            plans[epoch] = length_grouped_batches(lengths, mbs, settings.seed * 1000 + epoch)
        return plans[epoch][index % per_epoch]

    first = [train[i] for i in micro_batch(state.micro)]
    loss_mode = choose_loss_mode(
        model, collate(first[:2], pad_id, device), timing_batch=collate(first, pad_id, device) if on_cuda else None
    )
    model.train()
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="fine-tune",
        unit="step",
        disable=not (progress_bar and main),
        dynamic_ncols=True,
    )
    session_tokens, session_start, paused = 0, time.perf_counter(), 0.0
    resume_rng = _rng_state()  # the RNG state at the start of the next step to run
    saved_step = state.step if resume else -1

    def session_seconds() -> float:
        return time.perf_counter() - session_start - paused

    def checkpoint() -> Path:
        # Stored elapsed time includes this session so far; the caller's state is left as it is.
        folder = run_dir / "checkpoints" / f"step-{state.step:06d}"
        if main:  # one writer; the others resume from the same (shared) folder
            snapshot = dataclasses.replace(state, elapsed_s=state.elapsed_s + session_seconds())
            folder = _save_checkpoint(run_dir, model, optimizer, scheduler, snapshot, resume_rng, guard, scaler)
        return folder

    try:
        while state.step < total_steps:
            indices = [micro_batch(state.micro + i) for i in range(per_step)]
            # The mean over every answer token of the step, whichever process computes it.
            step_targets = sum(train[i].n_answer_tokens for mb in indices for i in mb)
            # Summed on the device and read once, after the update: a read per micro-batch would make
            # the host wait for the GPU to drain before it could queue the next micro-batch.
            step_loss_sum = torch.zeros((), dtype=torch.float32, device=device)
            step_tokens = 0
            for mb in indices[rank::world]:
                batch = collate([train[i] for i in mb], pad_id, device)
                with autocast(device, dtype):
                    loss = answer_loss(model, batch, mode=loss_mode) / step_targets
                (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss_sum += loss.detach().float()
                step_tokens += batch.n_tokens
            if world > 1:
                step_loss_sum, step_tokens = _all_reduce_step(params, step_loss_sum, step_tokens)
            with _sigint_deferred():
                if scaler is not None:
                    scaler.unscale_(optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                if scaler is not None:
                    scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                    scaler.update()
                else:
                    optimizer.step()
                step_loss = float(step_loss_sum)  # the one wait for the device in a step
                if time_limit_s is not None:  # before scheduler.step(), which sets the next step's rate
                    done, so_far = state.step + 1, session_seconds()
                    schedule.fit_to(done, time_limit_s - state.elapsed_s - so_far, so_far / (done - resumed_from))
                with warnings.catch_warnings():
                    # A step the scaler skipped (overflow; the first few while it finds its scale)
                    # still counts, so the schedule advances: torch warns about exactly that.
                    warnings.filterwarnings(
                        "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
                    )
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.micro += per_step
                state.tokens += step_tokens
                state.target_tokens += step_targets
                state.losses.append([state.step, step_loss])
                resume_rng = _rng_state()
            session_tokens += step_tokens
            session_s = session_seconds()
            info: dict[str, Any] = {
                "event": "step",
                "step": state.step,
                "total_steps": total_steps,
                "epoch": state.micro / per_epoch,
                "loss": step_loss,
                "lr": scheduler.get_last_lr()[0],
                "tokens": state.tokens,
                "tokens_per_s": session_tokens / session_s if session_s > 0 else 0.0,
                "elapsed_s": state.elapsed_s + session_s,
                "eta_s": session_s / (state.step - resumed_from) * (total_steps - state.step),
            }
            pause_start = time.perf_counter()  # evaluation and checkpoints do not count as training time
            if eval_fn is not None and eval_every and (state.step % eval_every == 0 or state.step == total_steps):
                info["eval_loss"] = eval_fn()
                state.eval_losses.append([state.step, info["eval_loss"]])
                model.train()
            if settings.checkpoint_every and state.step % settings.checkpoint_every == 0 and state.step < total_steps:
                checkpoint_path = checkpoint()
                saved_step = state.step
                info["checkpoint"] = str(checkpoint_path)
            paused += time.perf_counter() - pause_start
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{info['tokens_per_s']:.0f}", lr=f"{info['lr']:.1e}")
            bar.update(1)
            if on_progress is not None and main:
                on_progress(info)
            # Stop before a step that would overrun the budget (judged by this session's mean step).
            mean_step_s = session_s / (state.step - resumed_from)
            if time_limit_s is not None and state.step < total_steps and info["elapsed_s"] + mean_step_s > time_limit_s:
                break
    except KeyboardInterrupt:
        bar.close()
        optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is dropped; it reruns on resume
        if state.step > 0 and state.step != saved_step:
            checkpoint_path = checkpoint()
        raise TrainingInterrupted(state.step, total_steps, checkpoint_path) from None
    bar.close()
    session_s = session_seconds()
    state.elapsed_s += session_s
    tail = [loss for _, loss in state.losses[-10:]]
    return TrainResult(
        steps=state.step,
        total_steps=total_steps,
        final_loss=sum(tail) / len(tail) if tail else float("nan"),
        last_loss=state.losses[-1][1] if state.losses else float("nan"),
        losses=state.losses,
        eval_losses=state.eval_losses,
        tokens=state.tokens,
        target_tokens=state.target_tokens,
        seconds=state.elapsed_s,
        tokens_per_s=session_tokens / session_s if session_s > 0 else 0.0,
        resumed_from=resumed_from,
        checkpoint=checkpoint_path,
        peak_rss_mb=_peak_rss_mb(),
        loss_mode=loss_mode,
    )


# --------------------------------------------------------------------------------------------------
# The recipe: data → model → before → LoRA → fit → after → adapter + report


@dataclass
class FinetuneRequest:
    """What to train on and where the adapter goes; the hyper-parameters are in ``settings.finetune``."""

    output: str
    """Adapter name: it is saved as ``<data_dir>/adapters/<output>/``."""
    train_files: Sequence[Path] = ()
    eval_file: Path | None = None
    """Held-out file; without it the eval split is ``finetune.eval_fraction`` of the entries."""
    from_kb: bool = False
    from_conversations: bool = False
    max_steps: int | None = None
    resume: bool = False
    restart: bool = False
    """Discard the checkpoints of an earlier, unfinished run of the same name."""
    overwrite: bool = False
    activate: bool = False
    evaluate: bool = True
    eval_items: int = 32
    """Answers generated per layout for the quality metrics (generation is the slow part on a CPU)."""
    max_minutes: float | None = None
    """Stop training after this much training time (evaluation and saving come on top)."""
    refusal_fraction: float = 0.1

    @classmethod
    def from_args(cls, args: Any) -> FinetuneRequest:
        """The request that a ``supportbot finetune`` (or console job) command line describes: its
        parsed arguments of the same names, ``--train``/``--eval`` files and ``--no-answer-eval``."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(args).items() if k in names and v is not None}
        given["train_files"] = [Path(f) for f in getattr(args, "train", None) or []]
        given["eval_file"] = getattr(args, "eval", None)
        return cls(**given, evaluate=not getattr(args, "no_answer_eval", False))


@dataclass
class FinetuneResult:
    adapter: str
    path: Path
    activated: bool
    report: dict[str, Any]
    report_paths: dict[str, Path]

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "path": str(self.path),
            "activated": self.activated,
            "before": _without_items(self.report.get("before", {})),
            "after": _without_items(self.report.get("after", {})),
            "training": {
                k: v for k, v in self.report.get("training", {}).items() if k not in ("losses", "eval_losses")
            },
            "data": self.report.get("data", {}),
            "report": {k: str(v) for k, v in self.report_paths.items()},
        }


def _without_items(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the per-answer lists (those stay in report.json)."""
    return {
        k: ({kk: vv for kk, vv in v.items() if kk != "items"} if isinstance(v, dict) else v) for k, v in metrics.items()
    }


def _collect_pairs(
    settings: Settings,
    request: FinetuneRequest,
    entries: Sequence[Any] | None,
    conversation_pairs: Sequence[Any] | None,
    retrieve: Any,
) -> tuple[list[Any], Any]:
    """(pairs, retrieve) from the requested sources; opens the knowledge base when needed."""
    from finetune.data import lexical_retriever, load_pairs, pairs_from_conversations, pairs_from_entries

    k = settings.policy.max_context_entries
    needs_kb = request.from_kb or request.from_conversations
    if needs_kb and entries is None:
        try:
            from chatbot.services import open_knowledge_base
        except ImportError as exc:  # pragma: no cover - the service layer ships with the package
            raise TrainingError(
                f"cannot open the knowledge base: {exc}", fix="pass --train FILE instead of --from-kb"
            ) from exc
        kb = open_knowledge_base(settings)
        entries = list(kb.entries(enabled_only=True))
        if retrieve is None:

            def retrieve(question: str) -> list[Any]:
                # A few spare hits: eval entries are filtered out of training contexts.
                return [hit.entry for hit in kb.search(question, k + 2)]

    pairs: list[Any] = []
    if request.from_kb:
        pairs += pairs_from_entries(entries or [])
    if request.from_conversations:
        if conversation_pairs is None:
            from chatbot.services import open_conversation_store

            conversation_pairs = list(open_conversation_store(settings).training_pairs())
        pairs += pairs_from_conversations(conversation_pairs, entries or [])
    for file in request.train_files:
        pairs += load_pairs(file)
    if retrieve is None and entries:
        retrieve = lexical_retriever(list(entries), k)
    return pairs, retrieve


def run_finetune(
    settings: Settings,
    request: FinetuneRequest,
    *,
    entries: Sequence[Any] | None = None,
    conversation_pairs: Sequence[Any] | None = None,
    retrieve: Any = None,
    embedder: Any = None,
    on_progress: ProgressCallback | None = None,
    progress_bar: bool = True,
) -> FinetuneResult:
    """The whole recipe, as ``supportbot finetune`` and the web console run it.

    ``entries``, ``conversation_pairs``, ``retrieve`` and ``embedder`` replace the knowledge base,
    the conversation store, its retriever and the default embedder (tests, callers that have them
    open already). Raises DataError for bad data, TrainingInterrupted on Ctrl-C (checkpoint saved).
    """
    import torch

    from chatbot.adapters import AdapterRegistry, validate_adapter_name
    from chatbot.models import load_model
    from finetune import evaluate as ev
    from finetune.data import (
        DataError,
        dataset_hash,
        fit_examples,
        load_pairs,
        prepare_data,
    )
    from finetune.lora import adapter_metadata, apply_lora, save_adapter
    from knowledge_base.errors import Problem

    ft = settings.finetune
    name = validate_adapter_name(request.output)
    registry = AdapterRegistry(settings.data_dir)
    run_dir = Path(settings.data_dir) / RUNS_DIRNAME / name
    # Under torchrun / accelerate launch every process trains; only the first evaluates and writes.
    world, rank = _world()
    main = rank == 0
    notify = on_progress if on_progress is not None and main else (lambda info: None)

    if registry.exists(name) and not (request.overwrite or request.resume):
        raise TrainingError(
            f"an adapter named {name!r} exists already ({registry.path(name)})",
            fix="pick another --output, add --overwrite, or `supportbot adapters remove " + name + "`",
        )
    has_checkpoint = latest_checkpoint(run_dir) is not None
    if has_checkpoint and not (request.resume or request.restart):
        raise TrainingError(
            f"an unfinished run named {name!r} left checkpoints in {run_dir / 'checkpoints'}",
            fix="add --resume to continue it, or --restart to start over",
        )
    if request.resume and not has_checkpoint:
        finished = " (that run finished: its adapter exists)" if registry.exists(name) else ""
        raise TrainingError(
            f"nothing to resume: no checkpoint of a run named {name!r} in {run_dir / 'checkpoints'}{finished}",
            fix="start a new run without --resume",
        )
    if request.restart and main:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if not (request.from_kb or request.from_conversations or request.train_files):
        raise DataError(
            [Problem("training data", "no source given", "use --from-kb, --from-conversations and/or --train FILE")]
        )

    notify({"event": "phase", "phase": "data"})
    pairs, retrieve = _collect_pairs(settings, request, entries, conversation_pairs, retrieve)
    eval_pairs = load_pairs(request.eval_file) if request.eval_file else None
    data = prepare_data(
        pairs,
        layout=ft.layout,
        eval_fraction=ft.eval_fraction,
        seed=ft.seed,
        eval_pairs=eval_pairs,
        retrieve=retrieve,
        k=settings.policy.max_context_entries,
        refusal_fraction=request.refusal_fraction,
    )

    notify({"event": "phase", "phase": "loading model"})
    loaded = load_model(settings.model, settings.data_dir, for_training=True)
    tokenizer = loaded.tokenizer
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    # Long examples grow the budget up to the model's context; longer ones are skipped and listed.
    limit = min(settings.model.context_window, int(getattr(loaded.model.config, "max_position_embeddings", 0) or 10**9))
    fitted = fit_examples(data.train, tokenizer, ft.max_length, limit=limit)
    fitted_eval = fit_examples(data.eval, tokenizer, fitted.max_length, limit=limit)
    train_tok, eval_tok = fitted.examples, fitted_eval.examples
    data.stats["length"] = {**fitted.stats(ft.max_length), "eval_skipped_too_long": fitted_eval.skipped}
    if not train_tok:
        raise DataError(
            [Problem("training data", "every example is longer than the model's context", "shorten the answers")]
        )
    fingerprint = dataset_hash(train_tok)
    run_dir.mkdir(parents=True, exist_ok=True)
    for split, examples in (("train", data.train), ("eval", data.eval)) if main else ():
        lines = (json.dumps(e.to_dict(), ensure_ascii=False) for e in examples)
        atomic_write_text(run_dir / f"{split}.jsonl", "".join(line + "\n" for line in lines))

    if embedder is None and request.evaluate and main:
        from knowledge_base.embeddings import make_embedder

        embedder = make_embedder(settings.kb)
    answer_kwargs = {
        "max_new_tokens": settings.model.max_new_tokens,
        "max_items": request.eval_items,
        "embedder": embedder,
        "repetition_penalty": settings.model.repetition_penalty,
        "seed": ft.seed,
    }

    def full_eval(model: Any) -> dict[str, Any]:
        return ev.evaluate_model(
            model,
            tokenizer,
            data.eval,
            eval_tok,
            pad_id=pad_id,
            max_length=ft.max_length,
            answers=request.evaluate,
            **answer_kwargs,
        )

    before_file = run_dir / "before.json"
    before: dict[str, Any] = {}
    if eval_tok and main:
        if request.resume and before_file.is_file():
            before = json.loads(before_file.read_text(encoding="utf-8"))
        else:
            notify({"event": "phase", "phase": "evaluating the base model"})
            before = full_eval(loaded.model)
            atomic_write_text(before_file, json.dumps(before, indent=2) + "\n")

    notify({"event": "phase", "phase": "training"})
    torch.manual_seed(ft.seed)
    model = apply_lora(loaded.model, ft)
    eval_fn = (lambda: ev.evaluate_loss(model, eval_tok, pad_id=pad_id)["loss"]) if eval_tok and main else None
    result = fit(
        model,
        train_tok,
        ft,
        run_dir=run_dir,
        pad_id=pad_id,
        resume=request.resume,
        max_steps=request.max_steps,
        fingerprint=fingerprint,
        eval_fn=eval_fn,
        eval_every=ft.checkpoint_every,
        on_progress=on_progress,
        progress_bar=progress_bar,
        time_limit_s=request.max_minutes * 60 if request.max_minutes else None,
    )
    if not main:
        return FinetuneResult(name, registry.path(name), False, {"training": result.to_dict()}, {})

    after: dict[str, Any] = {}
    if eval_tok:
        notify({"event": "phase", "phase": "evaluating the adapter"})
        after = full_eval(model)
        if not result.eval_losses or result.eval_losses[-1][0] != result.steps:
            result.eval_losses.append([result.steps, after["loss"]])
        if before.get("loss") is not None:
            result.eval_losses.insert(0, [0, before["loss"]])

    notify({"event": "phase", "phase": "saving"})
    summary = {
        "before": {k: v for k, v in before.items() if k in ("loss", "perplexity")},
        "after": {k: v for k, v in after.items() if k in ("loss", "perplexity")},
    }
    for layout in ("rag", "closed"):
        for key in ("rouge_l", "token_f1", "embedding_cosine"):
            for when, section in (("before", before), ("after", after)):
                if isinstance(section.get(layout), dict) and key in section[layout]:
                    summary[when][f"{layout}_{key}"] = section[layout][key]
    summary["final_train_loss"] = result.final_loss  # type: ignore[assignment]
    metadata = adapter_metadata(
        base_model=settings.model.model,
        base_model_path=str(getattr(loaded.model, "name_or_path", "")),
        dataset_hash=fingerprint,
        settings=ft,
        metrics=summary,
        extra={"name": name, "data": data.stats, "steps": result.steps},
    )
    path = save_adapter(model, registry.path(name), metadata)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # finished: the adapter is the result
    report = {
        "adapter": name,
        "adapter_path": str(path),
        "base_model": settings.model.model,
        "created_at": metadata["created_at"],
        "dataset_hash": fingerprint,
        "data": data.stats,
        "settings": dataclasses.asdict(ft),
        "training": {
            **result.to_dict(),
            "device": str(loaded.device),
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "processes": world,
        },
        "before": before,
        "after": after,
    }
    report_paths = ev.write_report(report, run_dir)
    activated = False
    if request.activate:
        registry.activate(name)
        activated = True
    notify({"event": "phase", "phase": "done", "adapter": name})
    return FinetuneResult(name, path, activated, report, report_paths)
