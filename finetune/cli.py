"""``supportbot finetune`` and ``supportbot adapters ...`` (registered through the
``supportbot.commands`` entry point, so ``chatbot`` never imports this package).

Flags map onto ``settings.finetune`` (``--epochs`` → ``finetune.epochs`` ...), on top of what the
environment, TOML files and ``--set`` already gave; the recipe itself is
:func:`finetune.train.run_finetune`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from chatbot.adapters import AdapterRegistry
from chatbot.cli import emit
from chatbot.settings import Settings
from knowledge_base.errors import ConfigError

__all__ = ["add_commands"]

#: CLI flag (argparse dest) → field of ``settings.finetune``.
FLAG_FIELDS = {
    "epochs": "epochs",
    "lr": "learning_rate",
    "rank": "rank",
    "alpha": "alpha",
    "dropout": "dropout",
    "target_modules": "target_modules",
    "max_length": "max_length",
    "micro_batch_size": "micro_batch_size",
    "grad_accum": "grad_accum_steps",
    "layout": "layout",
    "seed": "seed",
    "checkpoint_every": "checkpoint_every",
    "eval_fraction": "eval_fraction",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
}


def add_commands(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "finetune",
        parents=parents,
        help="LoRA fine-tune the model on the FAQ, curated conversations or files",
        description="Train a LoRA adapter with before/after evaluation; see docs/finetuning.md.",
    )
    data = p.add_argument_group("data")
    data.add_argument("--train", type=Path, action="append", default=[], metavar="FILE", help="JSONL/JSON/CSV/TSV")
    data.add_argument("--eval", type=Path, metavar="FILE", help="held-out file (default: a split of the entries)")
    data.add_argument("--from-kb", action="store_true", help="every phrasing of every FAQ entry")
    data.add_argument("--from-conversations", action="store_true", help="thumbs-up answers and operator corrections")
    p.add_argument(
        "--output",
        required=True,
        metavar="NAME",
        help="adapter name (saved under <data-dir>/adapters), or retriever name with --retriever",
    )
    p.add_argument(
        "--retriever",
        action="store_true",
        help="fine-tune the retriever (embedder + optional reranker) instead of the generator; "
        "saved under <data-dir>/retrievers (docs/retrieval.md)",
    )
    hp = p.add_argument_group("training (default: the [finetune] settings)")
    hp.add_argument("--epochs", type=float)
    hp.add_argument("--lr", type=float, help="peak learning rate")
    hp.add_argument("--rank", type=int, help="LoRA rank r")
    hp.add_argument("--alpha", type=int, help="LoRA alpha")
    hp.add_argument("--dropout", type=float, help="LoRA dropout")
    hp.add_argument("--target-modules", help='"", "attention+mlp", "all-linear" or names: q_proj,v_proj')
    hp.add_argument("--max-length", type=int, help="tokens per example (prompt + answer)")
    hp.add_argument("--micro-batch-size", type=int)
    hp.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    hp.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    hp.add_argument("--max-minutes", type=float, help="stop training after this many minutes")
    hp.add_argument("--layout", choices=["rag", "closed", "both"], help="prompt layout of the training text")
    hp.add_argument("--seed", type=int)
    hp.add_argument("--checkpoint-every", type=int, metavar="STEPS")
    hp.add_argument("--eval-fraction", type=float, help="share of FAQ entries held out for evaluation")
    hp.add_argument("--warmup-ratio", type=float)
    hp.add_argument("--weight-decay", type=float)
    hp.add_argument("--gradient-checkpointing", action="store_true", default=None, help="less memory, slower")
    run = p.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run of the same --output")
    run.add_argument("--restart", action="store_true", help="discard an interrupted run's checkpoints")
    run.add_argument("--overwrite", action="store_true", help="replace an existing adapter of that name")
    run.add_argument("--activate", action="store_true", help="serve the adapter when done")
    run.add_argument("--eval-items", type=int, default=32, help="answers generated per layout for the metrics (0: all)")
    run.add_argument("--no-answer-eval", action="store_true", help="loss/perplexity only (no generation)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    from finetune.retriever import add_retriever_arguments

    add_retriever_arguments(p.add_argument_group("retriever (with --retriever)"))
    p.set_defaults(func=cmd_finetune)

    retrievers = commands.add_parser("retrievers", help="list, activate, roll back or remove fine-tuned retrievers")
    sub_r = retrievers.add_subparsers(dest="retrievers_command", required=True, metavar="ACTION")
    r = sub_r.add_parser("list", parents=parents, help="the retriever versions in the data dir")
    r.set_defaults(func=cmd_retrievers_list)
    r = sub_r.add_parser("activate", parents=parents, help="serve NAME (a running server re-embeds, then swaps)")
    r.add_argument("name")
    r.set_defaults(func=cmd_retrievers_activate)
    r = sub_r.add_parser("rollback", parents=parents, help="serve the version active before (or the base model)")
    r.set_defaults(func=cmd_retrievers_rollback)
    r = sub_r.add_parser("remove", parents=parents, help="delete NAME (not the active one)")
    r.add_argument("name")
    r.set_defaults(func=cmd_retrievers_remove)

    adapters = commands.add_parser("adapters", help="list, activate, merge or remove LoRA adapters")
    sub = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    a = sub.add_parser("list", parents=parents, help="the adapters in the data dir")
    a.set_defaults(func=cmd_list)
    a = sub.add_parser("activate", parents=parents, help="serve NAME (picked up without a restart)")
    a.add_argument("name")
    a.set_defaults(func=cmd_activate)
    a = sub.add_parser("deactivate", parents=parents, help="serve the plain model again")
    a.set_defaults(func=cmd_deactivate)
    a = sub.add_parser("merge", parents=parents, help="fold NAME into its base model and save a standalone model")
    a.add_argument("name")
    a.add_argument("--output", type=Path, metavar="DIR", help="default <data-dir>/models/<NAME>-merged")
    a.set_defaults(func=cmd_merge)
    a = sub.add_parser("remove", parents=parents, help="delete NAME (not the active one)")
    a.add_argument("name")
    a.set_defaults(func=cmd_remove)


def settings_from_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """``settings`` with the given training flags applied (and checked, all problems at once)."""
    changes = {
        field: getattr(args, flag) for flag, field in FLAG_FIELDS.items() if getattr(args, flag, None) is not None
    }
    if getattr(args, "gradient_checkpointing", None):
        changes["gradient_checkpointing"] = True
    updated = settings.replace(finetune=changes) if changes else settings
    problems = updated.finetune.problems()
    if problems:
        raise ConfigError(problems)
    return updated


def _text_summary(result: Any) -> str:
    from finetune.evaluate import summary_rows

    report = result.report
    training = report.get("training", {})
    lines = [
        f"adapter {result.adapter!r} saved in {result.path}" + (" and activated" if result.activated else ""),
        f"training: {training.get('steps')} steps in {float(training.get('seconds', 0)):.0f} s, "
        f"{float(training.get('tokens_per_s', 0)):.0f} real tokens/s, "
        f"final loss {float(training.get('final_loss', 0)):.4f}",
    ]
    rows = summary_rows(report.get("before", {}), report.get("after", {}))
    if rows:
        width = max(len(label) for label, _, _ in rows)
        lines.append(f"{'':<{width}}  {'before':>8}  {'after':>8}")
        for label, b, a in rows:
            fb = "-" if b is None else f"{b:.3f}"
            fa = "-" if a is None else f"{a:.3f}"
            lines.append(f"{label:<{width}}  {fb:>8}  {fa:>8}")
    if "markdown" in result.report_paths:
        lines.append(f"report: {result.report_paths['markdown']}")
    if not result.activated:
        lines.append(f"serve it with: supportbot adapters activate {result.adapter}")
    return "\n".join(lines)


def cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    if args.retriever:
        return cmd_finetune_retriever(args, settings)
    from finetune.train import FinetuneRequest, TrainingInterrupted, init_distributed, run_finetune

    settings = settings_from_flags(args, settings)
    # Launched by torchrun / accelerate launch: join their process group (env is their protocol).
    world, rank = init_distributed(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))
    request = FinetuneRequest.from_args(args)
    try:
        result = run_finetune(settings, request, progress_bar=not args.no_progress and sys.stderr.isatty())
    except TrainingInterrupted as exc:
        if rank == 0:
            payload = {
                **exc.to_dict(),
                "step": exc.step,
                "total_steps": exc.total_steps,
                "checkpoint": str(exc.checkpoint),
            }
            emit(args, payload, f"{exc}")
        return 130
    if rank == 0:  # one report, however many processes trained
        emit(args, {**result.to_dict(), "processes": world}, lambda: _text_summary(result))
    return 0


def _registry(settings: Settings) -> AdapterRegistry:
    return AdapterRegistry(settings.data_dir)


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    infos = _registry(settings).list()

    def text() -> str:
        if not infos:
            return "no adapters yet (train one: supportbot finetune --from-kb --output NAME)"
        lines = []
        for info in infos:
            rouge = info.metadata.get("metrics", {}).get("after", {}).get("rag_rouge_l")
            extra = f"  RAG ROUGE-L {rouge:.3f}" if isinstance(rouge, int | float) else ""
            base = info.metadata.get("base_model", "?")
            lines.append(f"{'*' if info.active else ' '} {info.name:<24} {info.created_at}  base {base}{extra}")
        return "\n".join(lines)

    active = next((i.name for i in infos if i.active), None)
    emit(args, {"adapters": [i.to_dict() for i in infos], "active": active}, text)
    return 0


def cmd_activate(args: argparse.Namespace, settings: Settings) -> int:
    info = _registry(settings).activate(args.name)
    emit(args, {"active": info.name, "version": info.version, "path": str(info.path)}, f"serving adapter {info.name}")
    return 0


def cmd_deactivate(args: argparse.Namespace, settings: Settings) -> int:
    previous = _registry(settings).deactivate()
    name = previous.name if previous else None
    emit(args, {"active": None, "previous": name}, f"adapter {name} deactivated" if name else "no adapter was active")
    return 0


def cmd_merge(args: argparse.Namespace, settings: Settings) -> int:
    from chatbot.models import load_model
    from finetune.lora import merge_adapter

    info = _registry(settings).get(args.name)
    base = str(info.metadata.get("base_model") or settings.model.model)
    loaded = load_model(settings.replace(model={"model": base}).model, settings.data_dir)
    output = args.output or settings.data_dir / "models" / f"{info.name}-merged"
    path = merge_adapter(loaded.model, info.path, output, tokenizer=loaded.tokenizer)
    emit(
        args,
        {"merged": info.name, "base_model": base, "path": str(path)},
        f"merged {info.name} into {base}: standalone model in {path}\nuse it with: --set model.model={path}",
    )
    return 0


def cmd_remove(args: argparse.Namespace, settings: Settings) -> int:
    info = _registry(settings).remove(args.name)
    emit(args, {"removed": info.name}, f"removed adapter {info.name}")
    return 0


# -- retrievers ------------------------------------------------------------------------------------


def cmd_finetune_retriever(args: argparse.Namespace, settings: Settings) -> int:
    from finetune.retriever import RetrieverRequest, summary_lines
    from finetune.train import TrainingInterrupted

    request = RetrieverRequest.from_args(args)
    try:
        result = request.run(settings, progress_bar=not args.no_progress and sys.stderr.isatty())
    except TrainingInterrupted as exc:
        payload = {**exc.to_dict(), "step": exc.step, "total_steps": exc.total_steps, "checkpoint": str(exc.checkpoint)}
        emit(args, payload, f"{exc}")
        return 130

    def text() -> str:
        head = f"retriever {result.name!r} saved in {result.path}" + (" and activated" if result.activated else "")
        tail = [] if result.activated else [f"serve it with: supportbot retrievers activate {result.name}"]
        return "\n".join([head, *summary_lines(result.report), *tail])

    emit(args, result.to_dict(), text)
    return 0


def _retrievers(settings: Settings) -> Any:
    from knowledge_base.retrievers import RetrieverRegistry

    return RetrieverRegistry(settings.data_dir)


def cmd_retrievers_list(args: argparse.Namespace, settings: Settings) -> int:
    versions = _retrievers(settings).list()

    def text() -> str:
        if not versions:
            return "no retrievers yet (train one: supportbot finetune --retriever --output NAME)"
        lines = []
        for v in versions:
            info = v.to_dict()
            p1 = info["p@1_before"], info["p@1_after"]
            figures = f"  P@1 {p1[0]:.3f} -> {p1[1]:.3f}" if None not in p1 else ""
            rr = "  +reranker" if info["reranker"] else ""
            lines.append(f"{'*' if v.active else ' '} {v.name:<24} {v.created_at}{figures}{rr}")
        return "\n".join(lines)

    active = next((v.name for v in versions if v.active), None)
    emit(args, {"retrievers": [v.to_dict() for v in versions], "active": active}, text)
    return 0


def cmd_retrievers_activate(args: argparse.Namespace, settings: Settings) -> int:
    version = _retrievers(settings).activate(args.name)
    thresholds = ", ".join(f"{k} {v:.2f}" for k, v in version.thresholds.items())
    pinned = " (pinned by policy.pin_thresholds: not applied)" if settings.policy.pin_thresholds else ""
    emit(
        args,
        {"active": version.name, "version": version.version, "thresholds": version.thresholds},
        f"serving retriever {version.name} (a running server re-embeds in the background, then swaps)"
        + (f"\nthresholds: {thresholds}{pinned}" if thresholds else ""),
    )
    return 0


def cmd_retrievers_rollback(args: argparse.Namespace, settings: Settings) -> int:
    version = _retrievers(settings).rollback()
    name = version.name if version else None
    emit(
        args,
        {"active": name},
        f"serving retriever {name}" if name else "serving the configured embedding model (no retriever version)",
    )
    return 0


def cmd_retrievers_remove(args: argparse.Namespace, settings: Settings) -> int:
    version = _retrievers(settings).remove(args.name)
    emit(args, {"removed": version.name}, f"removed retriever {version.name}")
    return 0
