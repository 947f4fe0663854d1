"""``lit-prune``: the Lightning CLI (fit, validate, test) plus lit-prune's own subcommands (eval).

Every subcommand reads the same YAML files (``--config configs/smollm2.yaml``): a ``model:`` section for
:class:`~lit_prune.CausalLMModule`, a ``data:`` section with a datamodule ``class_path``, and for the Trainer
subcommands a ``trainer:`` section. ``eval`` ignores the Trainer keys so one file serves all commands.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import torch
from jsonargparse import ActionYesNo, Namespace, set_parsing_settings
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from lit_prune.callbacks.base import PruningCallback
from lit_prune.callbacks.lora import LoRA
from lit_prune.cli_errors import (
    LIBRARY_ERRORS,
    CLIError,
    did_you_mean,
    innermost_error,
    parser_options,
    summarize_parser_error,
)
from lit_prune.cli_eval import EvalOptions, _model_shortcut, eval_parser, run_eval  # noqa: F401  (re-exported)
from lit_prune.cli_logging import LOG_LEVELS, cli_logging, pop_log_level
from lit_prune.datamodules import TokenDataModule
from lit_prune.datamodules.sources import _looks_like_file as looks_like_file
from lit_prune.eval.summary import format_table
from lit_prune.io import save_pretrained
from lit_prune.module import CausalLMModule
from lit_prune.plan import PLANS_FILE, PruningPlan, read_plans
from lit_prune.presets import resolve_data_uri
from lit_prune.report import write_report
from lit_prune.sparse.report import sparsity_report
from lit_prune.surgery import apply_plan, loads_without_lit_prune

log = logging.getLogger(__name__)

TRAINER_SUBCOMMANDS = ("fit", "validate", "test")
OWN_SUBCOMMANDS = ("eval", "prune", "report", "demo")
COMMANDS = {
    "prune": "run the config's pruning callbacks once (or replay saved plans with --plan) and save the model",
    "fit": "prune as the config's callbacks say (on fit start), then train / recover with LoRA",
    "validate": "one validation epoch (perplexity on the config's val text)",
    "test": "one test epoch",
    "eval": "one table: parameters, perplexity, prefill latency, decode speed, zero-shot tasks",
    "report": "write report.md with figures for a run folder or a saved model",
    "demo": "MoP to 25% of SmolLM2-135M-Instruct on the shared data: dense vs pruned, one table",
}
"""Every subcommand with its one-line description, as ``lit-prune --help`` lists them."""
_DESCRIPTION = (
    "lit-prune: prune Hugging Face causal LMs and recover them with LoRA in one Lightning Trainer. "
    "The same YAML configs serve every subcommand (`lit-prune --help` lists them)."
)
_PRUNE_DESCRIPTION = (
    "Prune without training: run the config's pruning callbacks (trainer.callbacks) once on its model and "
    "calibration data, or replay saved plans (--plan FILE; a sparsity plan re-computes its masks on the config's "
    "calibration data, which must be the data it was made on), and save the model with save_pretrained into "
    "--output (plus pruning_plans.json and report.md). Example: lit-prune prune --config configs/depth.yaml "
    "--output DIR"
)
_DATA_PATH_KEYS = ("path", "val_path", "test_path", "calibration_path")


def top_level_help() -> str:
    """The text of ``lit-prune --help``: every subcommand with one line, the global options, examples."""
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return (
        "usage: lit-prune [--log-level LEVEL] COMMAND [--config FILE.yaml] [options]\n\n"
        "Prune Hugging Face causal LMs and recover them with LoRA in one Lightning Trainer.\n\n"
        f"commands:\n{commands}\n\n"
        "options:\n"
        "  -h, --help         this message; `lit-prune COMMAND --help` lists the options of a command\n"
        f"  --log-level LEVEL  one of {', '.join(LOG_LEVELS)} (default info), accepted by every command; debug also\n"
        "                     shows Lightning's and transformers' info lines, progress bars and tracebacks\n\n"
        "examples:\n"
        "  lit-prune prune --config configs/depth.yaml --output runs/depth/pruned\n"
        "  lit-prune eval --config configs/smollm2.yaml --model runs/depth/pruned\n"
        "  lit-prune fit --config configs/mop_recover.yaml\n"
    )


class LitPruneCLI(LightningCLI):
    """LightningCLI over :class:`CausalLMModule` and any :class:`TokenDataModule` subclass (no ``predict``).

    A bad config raises :class:`~lit_prune.cli_errors.CLIError` with a one-line summary (and the closest allowed
    name) instead of printing the usage; the library's validation errors while instantiating do the same.
    """

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands that lit-prune supports: ``fit``, ``validate``, ``test``."""
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name in TRAINER_SUBCOMMANDS}

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args`` (lit-prune always passes them: it reads ``sys.argv`` itself, so no argv warning)."""
        try:
            if isinstance(args, dict | Namespace):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except argparse.ArgumentError as err:
            message = str(err)
            raise CLIError(summarize_parser_error(message, parser_options(parser)), detail=message) from None

    @override
    def instantiate_classes(self) -> None:
        """Instantiate as LightningCLI does; the library's validation errors become one-line CLI errors."""
        try:
            super().instantiate_classes()
        except LIBRARY_ERRORS as err:
            raise CLIError(str(innermost_error(err))) from err


def _parser_kwargs(prog: str, description: str) -> dict[str, Any]:
    return {"prog": prog, "description": description, "exit_on_error": False}


def trainer_cli(args: list[str] | None = None, run: bool = True) -> LitPruneCLI:
    """Run a Trainer subcommand, or with ``run=False`` only parse the config and instantiate the classes.

    Args:
        args: command-line words (``["fit", "--config", "x.yaml"]``); None reads ``sys.argv``. With
            ``run=False`` leave out the subcommand.
        run: run the subcommand after instantiating.

    Raises:
        CLIError: for a bad config (unknown or misspelled key, bad value) or a value the library refuses.
    """
    return LitPruneCLI(
        CausalLMModule,
        TokenDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=_parser_kwargs("lit-prune", _DESCRIPTION),
        args=sys.argv[1:] if args is None else args,
        run=run,
    )


class PruneCLI(LitPruneCLI):
    """The parser of ``lit-prune prune``: a fit config plus ``--output``, ``--overwrite`` and ``--plan``.

    Before any class is instantiated (the model loaded), it checks that every configured data path exists, that
    ``--output`` may be written, and reads ``--plan``.
    """

    plans: list[PruningPlan] | None = None
    """The plans read from ``--plan``, or None to score with the config's pruning callbacks."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--output", type=str, default="runs/pruned", help="Folder of the pruned model.")
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="Replace a non-empty --output written by lit-prune (it holds pruning_plans.json): its files are "
            "removed when the pruned model is saved (not before: an interrupted run leaves it as it was).",
        )
        parser.add_argument(
            "--plan",
            type=str | None,
            default=None,
            help="Replay saved plans instead of scoring: a plan JSON, a pruning_plans.json list, or a saved model "
            "folder holding pruning_plans.json, applied in order to the config's model. The config's pruning "
            "callbacks are then skipped. A sparsity plan re-computes its masks with its recorded method on the "
            "config's calibration data (data.calibration_dataloader()), which must be the calibration it was made "
            "on (same data, calibration_windows, calibration_seed, seq_len, batch_size): other data is refused "
            "before the model changes, and masks that come out different are an error.",
        )

    @override
    def before_instantiate_classes(self) -> None:
        check_data_paths(self.config.get("data"))
        check_output(Path(self.config["output"]), bool(self.config["overwrite"]))
        if self.config.get("plan"):
            self.plans = replayable_plans(self.config["plan"])


def check_data_paths(data: Any) -> None:
    """Check that every path the ``data`` section names exists (before anything is loaded).

    A value that reads as a Hugging Face dataset name (``wikitext``, ``owner/name``) is left to the datamodule.

    Raises:
        CLIError: naming the key and the path, for a file path that does not exist.
    """
    if data is None:
        return
    init_args = data.get("init_args") if hasattr(data, "get") else None
    if init_args is None:
        return
    for key in _DATA_PATH_KEYS:
        location = init_args.get(key) if hasattr(init_args, "get") else None
        if not isinstance(location, str):
            continue
        try:
            resolved = resolve_data_uri(location, key)
        except (ValueError, FileNotFoundError) as err:
            raise CLIError(f"--data.{key}: {err}") from None
        path = Path(resolved).expanduser()
        if not path.exists() and (looks_like_file(resolved) or location.startswith("data://")):
            shown = repr(location) if resolved == location else f"{location!r} ({resolved})"
            raise CLIError(f"--data.{key}: file {shown} does not exist (data.init_args.{key} in the config)")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an ``--output`` that would lose data: a file, or a non-empty folder without ``--overwrite``.

    With ``--overwrite`` the folder must be one lit-prune wrote (it holds ``pruning_plans.json``) and not the
    current folder, a folder above it, the home folder or the root.

    Raises:
        CLIError: saying why and what to do.
    """
    if output.exists() and not output.is_dir():
        raise CLIError(f"--output {str(output)!r} exists and is not a folder")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not overwrite:
        raise CLIError(
            f"--output {str(output)!r} already exists and is not empty; pass --overwrite to replace it "
            "(its old files, figures included, are removed) or choose another folder"
        )
    resolved = output.resolve()
    cwd = Path.cwd().resolve()
    if resolved in (cwd, *cwd.parents, Path.home().resolve(), Path(resolved.anchor)):
        raise CLIError(f"--overwrite refuses to replace {str(output)!r}: it is the current, home or root folder")
    if not (output / PLANS_FILE).is_file():
        raise CLIError(
            f"--overwrite refuses to replace {str(output)!r}: it holds no {PLANS_FILE}, so lit-prune did not "
            "write it; choose another folder"
        )


def replayable_plans(path: str) -> list[PruningPlan]:
    """The plans of ``--plan PATH`` (:func:`~lit_prune.plan.read_plans`), refusing sparsity plans without a record.

    Raises:
        CLIError: if the file cannot be read as plans, or holds a sparsity plan of format version 2 (it records how
            much of each block was zeroed, not how: there is nothing to replay).
    """
    try:
        plans = read_plans(path)
    except (MisconfigurationException, ValueError, FileNotFoundError, TypeError) as err:
        raise CLIError(f"--plan: {err}") from None
    for i, plan in enumerate(plans):
        if plan.method.startswith("sparsity") and plan.sparsity is None:
            raise CLIError(
                f"--plan: plan [{i}] ({plan.method}) is a sparsity plan without a `sparsity` record (written by an "
                "older lit-prune, plan format version 2): it records how much of each block was zeroed, not how, so "
                "it cannot be replayed; run its SparsityPruning config instead"
            )
    return plans


def _total_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def _summary(plans: list[PruningPlan], model: Any, before: int, output: Path, report: Path | None) -> str:
    """The result line of ``prune``: methods, parameters (and sparsity), where it went, how to reload it."""
    after = _total_params(model)
    text = f"Pruned with {', '.join(p.method for p in plans)}: params {before:,} -> {after:,}"
    if any(p.method.startswith("sparsity") for p in plans):
        report_ = sparsity_report(model)
        with torch.no_grad():
            nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
        text += f"; sparsity {report_.overall:.2%} of the prunable weights, nonzero params {nonzero:,}"
    stock = loads_without_lit_prune(model)
    loader = "AutoModelForCausalLM.from_pretrained" if stock else "lit_prune.load_pretrained"
    text += f"\nSaved to {output} (reload: {loader}({str(output)!r}), or `lit-prune eval --model {output}`)"
    if report is not None:
        text += f"\nReport: {report}"
    return text


def _save(module: CausalLMModule, output: Path, plans: list[PruningPlan]) -> Path:
    """Save into ``output`` (emptied first: :func:`check_output` allowed it); a failed save leaves no folder."""
    if output.is_dir():
        shutil.rmtree(output)  # empty, or a lit-prune folder with --overwrite: no stale files or figures
    try:
        return save_pretrained(module.model, output, tokenizer=module.tokenizer, plans=plans)
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)  # never a half-written model
        raise


def run_prune(args: list[str]) -> list[PruningPlan]:
    """``lit-prune prune``: apply the config's pruning callbacks once (or replay ``--plan``), without training.

    The model is saved with ``save_pretrained`` (plus its tokenizer) into ``--output``, with the applied plans in
    ``pruning_plans.json``, and ``report.md`` is written next to it; a uniform result reloads with plain
    ``AutoModelForCausalLM.from_pretrained``. Nothing is written to ``--output`` until the model is pruned.

    Args:
        args: command-line words after ``prune`` (``["--config", "configs/depth.yaml"]``).

    Returns:
        The applied plans, in order.

    Raises:
        CLIError: for a bad config, a missing data file, an ``--output`` that may not be replaced, a bad ``--plan``,
            a config without pruning callback (and no ``--plan``), or Ctrl-C (code 130, saying what was saved).
    """
    saved: Path | None = None
    try:
        cli = PruneCLI(
            CausalLMModule,
            TokenDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            save_config_callback=None,
            parser_kwargs=_parser_kwargs("lit-prune prune", _PRUNE_DESCRIPTION),
            args=args,
            run=False,
        )
        all_callbacks = list(getattr(cli.trainer, "callbacks", []))
        callbacks = [cb for cb in all_callbacks if isinstance(cb, PruningCallback)]
        if cli.plans is not None and callbacks:
            log.warning(
                "--plan given: the config's pruning callbacks %s are skipped", [type(cb).__name__ for cb in callbacks]
            )
        elif cli.plans is None and not callbacks:
            raise CLIError(
                "the config has no pruning callback under `trainer.callbacks` "
                "(e.g. class_path: lit_prune.callbacks.DepthPruning); or replay saved plans with --plan FILE"
            )
        skipped = [type(cb).__name__ for cb in all_callbacks if isinstance(cb, LoRA)]
        if skipped:
            log.warning("%s act during training and are skipped here; use `lit-prune fit`", skipped)
        module: CausalLMModule = cli.model
        before = _total_params(module.model)
        if cli.plans is not None:
            plans = _replay(module, cli.plans, cli.config["plan"], cli.datamodule, cli.trainer.strategy.root_device)
        else:
            plans = _score_and_prune(module, cli.datamodule, callbacks, cli.trainer.strategy.root_device)
        output = Path(cli.config["output"])
        saved = _save(module, output, plans)
        report = write_report(output)
    except KeyboardInterrupt:
        what = "nothing was saved" if saved is None else f"the model is saved in {saved}; its report was not written"
        raise CLIError(f"interrupted; {what}", code=130) from None
    print(_summary(plans, module.model, before, output, report))
    return plans


def _replay(
    module: CausalLMModule, plans: list[PruningPlan], source: str, data: Any, device: torch.device
) -> list[PruningPlan]:
    """Apply saved plans in order; a plan that does not fit the model (or its calibration) is a one-line error.

    A sparsity plan re-computes its masks on ``data.calibration_dataloader()`` (what the pruning callbacks read) through
    :func:`lit_prune.surgery.apply_plan`, and a plan with a ``reconstruction`` record refits its weights on it. Like
    :class:`~lit_prune.callbacks.SparsityPruning`, a sparsity plan leaves the module's structural plan list
    (``module.pruning_plans``, replayed from checkpoints) alone: the masks are buffers.
    """
    log.info("Replaying %d plan(s) from %s", len(plans), source)
    if any(plan.changes_sparsity or plan.reconstruction is not None for plan in plans):
        if isinstance(data, TokenDataModule) and data.tokenizer is None:
            data.tokenizer = module.tokenizer
        module.to(device)
    for i, plan in enumerate(plans):
        try:
            if plan.changes_sparsity:
                apply_plan(module.model, plan, calibration=_replay_calibration(data, i, plan))
            elif plan.reconstruction is not None:
                module.apply_plan(plan, calibration=_replay_calibration(data, i, plan))
            else:
                module.apply_plan(plan)
        except (ValueError, TypeError) as err:
            what = "cannot be replayed" if plan.changes_sparsity else "does not fit the model"
            raise CLIError(f"--plan: plan [{i}] ({plan.method}) {what}: {err}") from None
    return plans


def _replay_calibration(data: Any, index: int, plan: PruningPlan) -> Any:
    """The calibration batches a sparsity or reconstruction plan replays on: ``data.calibration_dataloader()``."""
    factory = getattr(data, "calibration_dataloader", None)
    if factory is None:
        raise CLIError(
            f"--plan: plan [{index}] ({plan.method}) re-computes its masks or refits on calibration data, but the "
            f"config's datamodule ({type(data).__name__}) has no calibration_dataloader(); use the data section of "
            "the config the plan was made with"
        )
    return factory()


def _score_and_prune(
    module: CausalLMModule, data: Any, callbacks: list[PruningCallback], device: torch.device
) -> list[PruningPlan]:
    """Run each pruning callback once on the calibration windows; the plans it applied, in order."""
    if isinstance(data, TokenDataModule) and data.tokenizer is None:
        data.tokenizer = module.tokenizer
    module.to(device)
    plans = []
    for callback in callbacks:
        applied = callback.prune_all(module, callback.calibration_loader(data))
        callback.plans.extend(plan.to_dict() for plan in applied)
        plans.extend(applied)
    return plans


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
        raise CLIError(str(err)) from None
    print(f"Wrote {path}")
    return path


def _dispatch(command: str | None, words: list[str]) -> None:
    """Run one subcommand (``words`` without the ``--log-level`` option)."""
    if command is None or command in ("-h", "--help"):
        print(top_level_help())
        return
    if command == "eval":
        print(format_table([run_eval(words[1:])]))
    elif command == "prune":
        run_prune(words[1:])
    elif command == "report":
        run_report(words[1:])
    elif command == "demo":
        from lit_prune.demo import run_demo

        print(run_demo(words[1:]))
    elif command in TRAINER_SUBCOMMANDS:
        trainer_cli(words)
    else:
        commands = ", ".join(COMMANDS)
        raise CLIError(f"unknown command {command!r}{did_you_mean(command, COMMANDS)}; choose one of: {commands}")


def _exit(prog: str, err: CLIError, debug: bool) -> NoReturn:
    """Print ``err`` as the first lines of stderr and exit with its code."""
    if err.code == 130:
        print(f"{prog}: {err.message}", file=sys.stderr)
    else:
        print(f"{prog}: error: {err.message}", file=sys.stderr)
        if err.code == 2:
            print(f"See `{prog} --help` for the options; `--log-level debug` shows more.", file=sys.stderr)
    if debug:
        if err.detail:
            print(err.detail, file=sys.stderr)
        cause = err.__cause__
        if cause is not None:
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
    exit_ = SystemExit(err.message)  # str() is the message (for callers of main()), the status is err.code
    exit_.code = err.code
    raise exit_


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lit-prune`` console script.

    Args:
        argv: command-line words (``["prune", "--config", "x.yaml"]``); None reads ``sys.argv``.

    Raises:
        SystemExit: 2 for a bad command line or config, 1 for a library error while running, 130 on Ctrl-C; the
            message comes first on stderr, the traceback only at ``--log-level debug``.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        words, level = pop_log_level(words)
    except CLIError as err:
        named = next((w for w in words if w in COMMANDS), None)
        _exit(f"lit-prune {named}" if named else "lit-prune", err, debug=False)
    command = words[0] if words else None
    prog = f"lit-prune {command}" if command in COMMANDS else "lit-prune"
    debug = level == "debug"
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    with cli_logging(level):
        try:
            _dispatch(command, words)
        except CLIError as err:
            _exit(prog, err, debug)
        except KeyboardInterrupt:
            what = "; nothing was written" if command == "eval" else ""  # eval writes its JSON last
            _exit(prog, CLIError(f"interrupted{what}", code=130), debug)
        except LIBRARY_ERRORS as err:
            wrapped = CLIError(str(err), code=1)
            wrapped.__cause__ = err
            _exit(prog, wrapped, debug)


if __name__ == "__main__":
    main()
