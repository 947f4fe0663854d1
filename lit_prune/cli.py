"""``lit-prune``: the Lightning CLI (fit, validate, test) plus lit-prune's own subcommands (eval).

Every subcommand reads the same YAML files (``--config configs/smollm2.yaml``): a ``model:`` section for
:class:`~lit_prune.CausalLMModule`, a ``data:`` section with a datamodule ``class_path``, and for the Trainer
subcommands a ``trainer:`` section. ``eval`` ignores the Trainer keys so one file serves all commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback
from lit_prune.callbacks.lora import LoRA
from lit_prune.datamodules import TextDataModule, TokenDataModule
from lit_prune.eval.summary import EvalSummary, evaluate_model, format_table
from lit_prune.eval.zeroshot import zero_shot
from lit_prune.io import save_pretrained
from lit_prune.module import CausalLMModule
from lit_prune.plan import PruningPlan
from lit_prune.presets import CPU_PROTOCOL
from lit_prune.report import write_report
from lit_prune.shapes import loads_without_lit_prune

log = logging.getLogger(__name__)

TRAINER_SUBCOMMANDS = ("fit", "validate", "test")
OWN_SUBCOMMANDS = ("eval", "prune", "report", "demo")
_NO_TEXT_HINT = (
    "Point it at text with --data.val_path FILE (.txt/.raw/.jsonl/.parquet) or an HF dataset name "
    "(--data.val_path wikitext --data.dataset_config wikitext-2-raw-v1 --data.val_split test)."
)


_DESCRIPTION = (
    "lit-prune: prune Hugging Face causal LMs and recover them with LoRA in one Lightning Trainer. "
    "Trainer subcommands: fit, validate, test. lit-prune subcommands: eval (parameters, perplexity, "
    "latency, zero-shot table; see `lit-prune eval --help`), prune (run the config's pruning callbacks without "
    "training and save the model; `lit-prune prune --config configs/depth.yaml --output DIR`) and report (write "
    "report.md with figures for a run folder; `lit-prune report RUN_DIR`)."
)


class LitPruneCLI(LightningCLI):
    """LightningCLI over :class:`CausalLMModule` and any :class:`TokenDataModule` subclass (no ``predict``)."""

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands that lit-prune supports: ``fit``, ``validate``, ``test``."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in TRAINER_SUBCOMMANDS}


def trainer_cli(args: list[str] | None = None, run: bool = True) -> LitPruneCLI:
    """Run a Trainer subcommand, or with ``run=False`` only parse the config and instantiate the classes.

    Args:
        args: command-line words (``["fit", "--config", "x.yaml"]``); None reads ``sys.argv``. With
            ``run=False`` leave out the subcommand.
        run: run the subcommand after instantiating.
    """
    return LitPruneCLI(
        CausalLMModule,
        TokenDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": _DESCRIPTION},
        args=args,
        run=run,
    )


class PruneCLI(LitPruneCLI):
    """The parser of ``lit-prune prune``: a fit config plus ``--output``."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output", type=str, default="runs/pruned", help="Folder of the pruned model.")


def run_prune(args: list[str]) -> list[PruningPlan]:
    """``lit-prune prune``: apply the config's pruning callbacks once, without training, and save the result.

    The model is saved with ``save_pretrained`` (plus its tokenizer) into ``--output``, with the applied plans in
    ``pruning_plans.json``; a uniform result reloads with plain ``AutoModelForCausalLM.from_pretrained``.

    Args:
        args: command-line words after ``prune`` (``["--config", "configs/depth.yaml"]``).

    Returns:
        The applied plans, in order.

    Raises:
        SystemExit: if the config has no pruning callback in ``trainer.callbacks``.
    """
    cli = PruneCLI(
        CausalLMModule,
        TokenDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=None,
        parser_kwargs={"description": "Prune without training: " + _DESCRIPTION},
        args=args,
        run=False,
    )
    callbacks = [cb for cb in getattr(cli.trainer, "callbacks", []) if isinstance(cb, PruningCallback)]
    if not callbacks:
        raise SystemExit(
            "lit-prune prune: the config has no pruning callback under `trainer.callbacks` "
            "(e.g. class_path: lit_prune.callbacks.DepthPruning)"
        )
    skipped = [type(cb).__name__ for cb in getattr(cli.trainer, "callbacks", []) if isinstance(cb, LoRA)]
    if skipped:
        log.warning("lit-prune prune: %s act during training and are skipped here; use `lit-prune fit`", skipped)
    module: CausalLMModule = cli.model
    data = cli.datamodule
    if isinstance(data, TokenDataModule) and data.tokenizer is None:
        data.tokenizer = module.tokenizer
    module.to(cli.trainer.strategy.root_device)
    plans = []
    for callback in callbacks:
        applied = callback.prune_all(module, callback.calibration_loader(data))
        callback.plans.extend(plan.to_dict() for plan in applied)
        plans.extend(applied)
    output = save_pretrained(module.model, cli.config["output"], tokenizer=module.tokenizer, plans=plans)
    report = write_report(output)
    first, last = plans[0], plans[-1]
    stock = loads_without_lit_prune(module.model)
    loader = "AutoModelForCausalLM.from_pretrained" if stock else "lit_prune.load_pretrained"
    print(
        f"Pruned with {', '.join(p.method for p in plans)}: params {first.params_before:,} -> {last.params_after:,}; "
        f"saved to {output} (reload: {loader}({str(output)!r}) or "
        f"`lit-prune eval --model {output} --config ...`); report: {report}"
    )
    return plans


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
    """
    parser = eval_parser()
    cfg = parser.parse_args(_model_shortcut(args))
    init = parser.instantiate_classes(cfg)
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
            raise SystemExit("lit-prune eval --tasks needs a tokenizer: give --model.tokenizer")
        summary.zeroshot = zero_shot(
            module.model,
            module.tokenizer,
            tasks,
            limit=limit,
            batch_size=opts.zeroshot_batch_size,
            data_dir=opts.data_dir,
        )
    print(format_table([summary]))
    if opts.output:
        Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.output).write_text(json.dumps(summary.as_dict(), indent=2, default=str))
        print(f"Wrote {opts.output}")
    return summary


def run_report(args: list[str]) -> Path:
    """``lit-prune report RUN_DIR [--output DIR]``: write ``report.md`` with its figures for a pruning run.

    Args:
        args: command-line words after ``report``.

    Returns:
        The path of the written ``report.md``.
    """
    parser = argparse.ArgumentParser(
        prog="lit-prune report",
        description="Write report.md (with PNG figures in report/) for a pruning run: the folder holding the "
        "'<callback>-plan-<n>.json' files a fit wrote (searched recursively), or a saved model folder with "
        "pruning_plans.json. Measurements come from report-measurements.json (the PruningReport callback).",
    )
    parser.add_argument("run_dir", help="The run folder.")
    parser.add_argument("--output", default=None, help="Write the report here instead of into RUN_DIR.")
    opts = parser.parse_args(args)
    try:
        path = write_report(opts.run_dir, opts.output)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"lit-prune report: {err}") from None
    print(f"Wrote {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lit-prune`` console script."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] == "eval":
        run_eval(argv[1:])
        return
    if argv and argv[0] == "prune":
        run_prune(argv[1:])
        return
    if argv and argv[0] == "report":
        run_report(argv[1:])
        return
    if argv and argv[0] == "demo":
        from lit_prune.demo import run_demo

        print(run_demo(argv[1:]))
        return
    if argv and not argv[0].startswith("-") and argv[0] not in TRAINER_SUBCOMMANDS:
        commands = ", ".join((*TRAINER_SUBCOMMANDS, *OWN_SUBCOMMANDS))
        raise SystemExit(f"lit-prune: unknown command {argv[0]!r}; choose one of: {commands}")
    trainer_cli(None if from_command_line else argv)  # LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
