"""``lit-prune eval``: one table (parameters, perplexity, prefill latency, decode speed, zero-shot) for a config."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser

from lit_prune.cli_errors import LIBRARY_ERRORS, CLIError, innermost_error, parser_options, summarize_parser_error
from lit_prune.datamodules import TextDataModule, TokenDataModule
from lit_prune.eval.summary import EvalSummary, evaluate_model
from lit_prune.eval.zeroshot import zero_shot
from lit_prune.module import CausalLMModule
from lit_prune.presets import CPU_PROTOCOL

log = logging.getLogger(__name__)

_NO_TEXT_HINT = (
    "Point it at text with --data.val_path FILE (.txt/.raw/.jsonl/.parquet) or an HF dataset name "
    "(--data.val_path wikitext --data.dataset_config wikitext-2-raw-v1 --data.val_split test)."
)


@dataclass
class EvalOptions:
    """What ``lit-prune eval`` measures besides parameter counts."""

    ppl: bool = True
    """Score perplexity on the data module's validation windows (``val_path``, ``max_val_windows``)."""
    latency: bool = True
    """Measure prefill latency and decode speed."""
    prompt_len: int = CPU_PROTOCOL.latency_prompt_len
    """Prompt length of the latency runs, in tokens."""
    batch_sizes: list[int] = field(default_factory=lambda: list(CPU_PROTOCOL.latency_batch_sizes))
    """Batch sizes of the prefill measurement."""
    new_tokens: int = CPU_PROTOCOL.latency_new_tokens
    """Tokens decoded one at a time with the KV cache (batch 1)."""
    repeats: int = CPU_PROTOCOL.latency_repeats
    """Timed repeats; the median is reported."""
    tasks: list[str] | None = None
    """Zero-shot tasks scored with lm-eval on the in-memory model (e.g. [piqa, arc_easy]; local files by default,
    see ``lit_prune.eval.tasks.LOCAL_TASKS``); none by default. ``--tasks piqa,arc_easy`` is the short form."""
    limit: int | None = None
    """Score only the first N items of each zero-shot task (``--limit N``)."""
    zeroshot_batch_size: int = 8
    """lm-eval batch size of the zero-shot tasks."""
    data_dir: str | None = None
    """Folder of the local zero-shot task files; default the shared data folder ($LIT_PRUNE_DATA_DIR)."""
    output: str | None = None
    """Also write the results as JSON to this file."""
    progress: bool = True
    """Show progress bars."""


def eval_parser() -> LightningArgumentParser:
    """Parser of ``lit-prune eval``: the ``model`` and ``data`` sections of a config plus :class:`EvalOptions`."""
    parser = LightningArgumentParser(
        prog="lit-prune eval",
        description="Print one table: parameters, perplexity with its protocol, prefill latency and decode speed.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (the same files as `fit`).")
    parser.add_class_arguments(CausalLMModule, "model", fail_untyped=False, sub_configs=True)
    parser.add_subclass_arguments(TokenDataModule, "data", required=False)
    parser.set_defaults({"data": {"class_path": f"{TextDataModule.__module__}.{TextDataModule.__name__}"}})
    parser.add_class_arguments(EvalOptions, "eval")
    parser.add_argument("--tasks", type=str | None, default=None, help="Zero-shot tasks, comma-separated.")
    parser.add_argument("--limit", type=int | None, default=None, help="Items per zero-shot task (all: omit).")
    for ignored in ("trainer", "seed_everything", "ckpt_path", "optimizer", "lr_scheduler"):
        parser.add_argument(f"--{ignored}", type=Any, default=None, help="Ignored by eval (config compatibility).")
    return parser


def _eval_windows(data: TokenDataModule | None, module: CausalLMModule) -> tuple[Any, str | None]:
    """Windows to score and their source, or ``(None, None)`` with a one-line warning when there is no text."""
    if data is None:
        return None, None
    if not isinstance(data, TextDataModule):
        log.warning("eval scores perplexity on TextDataModule windows; %s is skipped.", type(data).__name__)
        return None, None
    if data.tokenizer is None:
        data.tokenizer = module.tokenizer
    if not data.has_role("val"):
        log.warning("No evaluation text configured. %s", _NO_TEXT_HINT)
        return None, None
    try:
        windows = data.windows("val")
    except FileNotFoundError as err:
        log.warning("No evaluation text: %s. %s", err, _NO_TEXT_HINT)
        return None, None
    return windows, data.val_path or data.path


def _model_shortcut(args: list[str]) -> list[str]:
    """``--model PATH`` (a checkpoint folder, hub id or ``builtin:...``) as ``--model.model PATH``.

    ``--model FILE.yaml`` stays a config of the ``model`` section.
    """
    out: list[str] = []
    words = iter(args)
    for word in words:
        value = None
        if word == "--model":
            value = next(words, None)
        elif word.startswith("--model="):
            value = word.split("=", 1)[1]
        else:
            out.append(word)
            continue
        if value is None:
            out.append(word)
        elif value.endswith((".yaml", ".yml", ".json")) or value.lstrip().startswith("{"):
            out += ["--model", value]
        else:
            out += ["--model.model", value]
    return out


def run_eval(args: list[str]) -> EvalSummary:
    """``lit-prune eval``: measure the model a config describes, print the table, optionally write JSON.

    Args:
        args: command-line words after ``eval`` (``["--config", "configs/smollm2.yaml"]``).

    Returns:
        The measurements, as printed.

    Raises:
        CLIError: for a bad config or a value the library refuses while instantiating.
    """
    parser = eval_parser()
    try:
        cfg = parser.parse_args(_model_shortcut(args))
    except argparse.ArgumentError as err:
        message = str(err)
        raise CLIError(summarize_parser_error(message, parser_options(parser)), detail=message) from None
    try:
        init = parser.instantiate_classes(cfg)
    except LIBRARY_ERRORS as err:
        raise CLIError(str(innermost_error(err))) from err
    module: CausalLMModule = init.model
    opts: EvalOptions = init.eval
    data = init.data if opts.ppl else None
    windows, source = _eval_windows(data, module)
    latency_kwargs = (
        {
            "prompt_len": opts.prompt_len,
            "batch_sizes": tuple(opts.batch_sizes),
            "new_tokens": opts.new_tokens,
            "repeats": opts.repeats,
        }
        if opts.latency
        else None
    )
    tasks = [t.strip() for t in cfg.tasks.split(",") if t.strip()] if cfg.tasks else opts.tasks
    limit = cfg.limit if cfg.limit is not None else opts.limit
    name = str(module.hparams.get("model") or type(module.model).__name__)
    batch_size = getattr(data, "batch_size", 4)
    summary = evaluate_model(
        module.model,
        name,
        windows,
        source,
        batch_size=batch_size,
        latency_kwargs=latency_kwargs,
        progress=opts.progress,
    )
    if tasks:
        if module.tokenizer is None:
            raise CLIError("--tasks needs a tokenizer: give --model.tokenizer")
        summary.zeroshot = zero_shot(
            module.model,
            module.tokenizer,
            tasks,
            limit=limit,
            batch_size=opts.zeroshot_batch_size,
            data_dir=opts.data_dir,
        )
    if opts.output:
        Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.output).write_text(json.dumps(summary.as_dict(), indent=2, default=str))
        log.info("Wrote %s", opts.output)
    return summary
