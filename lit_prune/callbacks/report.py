"""``PruningReport``: measure the model before pruning and after the fit, and write the run's ``report.md``.

Without this callback the pruning callbacks still write ``report.md`` when the fit ends (parameters, structure,
importance heatmaps, MoP path); this callback adds perplexity, latency and zero-shot accuracy of the dense and the
final model to it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_prune.callbacks.base import output_folder
from lit_prune.datamodules import TextDataModule
from lit_prune.eval.summary import EvalSummary, evaluate_model
from lit_prune.eval.zeroshot import zero_shot
from lit_prune.presets import CPU_PROTOCOL
from lit_prune.report import MEASUREMENTS_FILE, write_report

log = logging.getLogger(__name__)


class PruningReport(Callback):
    """Measure the dense model (``setup``) and the final one (``teardown``), then write the run's report.

    The dense model is measured in ``setup``, before any pruning callback acts, wherever this callback is listed;
    the final model in ``teardown``, after every ``on_fit_end`` (so LoRA adapters are merged and MoP has saved).
    Both are measured on the device the model sits on outside the fit (the CPU unless you moved it; Lightning moves
    the model back to the CPU when a GPU fit ends), so the latency ratio compares like with like. Rank 0 measures;
    the numbers go to ``report-measurements.json`` and ``report.md`` next to the pruning plans, and to the logger
    (``report/<dense|pruned>/ppl``, ``.../prefill_ms_b1``, ``.../decode_tok_s``, ``.../avg_acc``).

    Args:
        ppl: score perplexity on the datamodule's validation windows (a :class:`TextDataModule` with ``val_path``).
        max_windows: use at most this many validation windows (None: all).
        batch_size: windows per forward pass.
        latency: measure prefill latency and decode speed (:func:`lit_prune.eval.latency`).
        prompt_len: prompt length of the latency runs, in tokens.
        batch_sizes: batch sizes of the prefill measurement.
        new_tokens: tokens decoded with the KV cache (batch 1).
        repeats: timed repeats (the median is reported).
        tasks: zero-shot tasks (:data:`lit_prune.eval.tasks.LOCAL_TASKS` or lm-eval names); None skips them.
        limit: items per zero-shot task (None: all).
        zeroshot_batch_size: lm-eval batch size.
        data_dir: folder of the local zero-shot task files (None: ``$LIT_PRUNE_DATA_DIR`` / the shared data).
        verbose: 0 silent, 1 log the comparison.

    Raises:
        MisconfigurationException: for non-positive sizes or counts, or an empty task list.

    Example::

        trainer = pl.Trainer(callbacks=[MixtureOfPruners(target=0.25), PruningReport(tasks=["piqa"], limit=100)])
    """

    writes_report: ClassVar[bool] = True
    """Tells the pruning callbacks that this callback writes ``report.md`` (so they do not, see ``PruningCallback``)."""

    def __init__(
        self,
        ppl: bool = True,
        max_windows: int | None = 16,
        batch_size: int = 4,
        latency: bool = True,
        prompt_len: int = CPU_PROTOCOL.latency_prompt_len,
        batch_sizes: Sequence[int] = CPU_PROTOCOL.latency_batch_sizes,
        new_tokens: int = CPU_PROTOCOL.latency_new_tokens,
        repeats: int = CPU_PROTOCOL.latency_repeats,
        tasks: Sequence[str] | None = None,
        limit: int | None = None,
        zeroshot_batch_size: int = 8,
        data_dir: str | None = None,
        verbose: int = 1,
    ) -> None:
        for name, value, optional in (
            ("max_windows", max_windows, True),
            ("batch_size", batch_size, False),
            ("prompt_len", prompt_len, False),
            ("new_tokens", new_tokens, False),
            ("repeats", repeats, False),
            ("limit", limit, True),
            ("zeroshot_batch_size", zeroshot_batch_size, False),
        ):
            if (value is None and not optional) or (
                value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
            ):
                allowed = "None or an int >= 1" if optional else "an int >= 1"
                raise MisconfigurationException(f"`{name}` must be {allowed}, got {value!r}")
        sizes = list(batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise MisconfigurationException(f"`batch_sizes` must be a non-empty list of ints >= 1, got {batch_sizes!r}")
        if tasks is not None and (isinstance(tasks, str) or not list(tasks)):
            raise MisconfigurationException(f"`tasks` must be None or a non-empty list of task names, got {tasks!r}")
        if verbose not in (0, 1, 2):
            raise MisconfigurationException(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
        self.ppl = ppl
        self.max_windows = max_windows
        self.batch_size = batch_size
        self.latency_kwargs: dict[str, Any] | None = (
            {"prompt_len": prompt_len, "batch_sizes": tuple(sizes), "new_tokens": new_tokens, "repeats": repeats}
            if latency
            else None
        )
        self.tasks = tuple(tasks) if tasks is not None else None
        self.limit = limit
        self.zeroshot_batch_size = zeroshot_batch_size
        self.data_dir = data_dir
        self.verbose = verbose
        self.dense: EvalSummary | None = None
        """Measurements of the model before pruning (rank 0)."""
        self.pruned: EvalSummary | None = None
        """Measurements of the model after the fit (rank 0)."""
        self.report_path: Path | None = None
        """Where the report was written (rank 0)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.dense is not None:
            return
        if getattr(pl_module, "pruning_plans", None):
            rank_zero_warn("PruningReport: the model is already pruned (resumed run?); its 'dense' column is not dense")
        self.dense = self.measure(trainer, pl_module, "dense")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        folder = output_folder(trainer)  # a collective under DDP: every rank calls it
        if not trainer.is_global_zero or self.dense is None:
            return
        self.pruned = self.measure(trainer, pl_module, "pruned")
        folder.mkdir(parents=True, exist_ok=True)
        data = {"dense": _json_ready(self.dense), "pruned": _json_ready(self.pruned)}
        (folder / MEASUREMENTS_FILE).write_text(json.dumps(data, indent=2, default=str))
        if not any(folder.glob("*-plan-*.json")):
            rank_zero_warn(f"PruningReport: no pruning plan in {folder}; measurements saved, no report written")
            return
        self.report_path = write_report(folder)
        if self.verbose:
            rank_zero_info(f"PruningReport: wrote {self.report_path}")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> EvalSummary:
        """Measure ``pl_module``'s model now and log the headline numbers as ``report/<name>/...``."""
        windows, source = self._windows(trainer, pl_module)
        was_training = pl_module.training
        summary = evaluate_model(
            pl_module,
            name,
            windows,
            source,
            batch_size=self.batch_size,
            latency_kwargs=self.latency_kwargs,
            progress=self.verbose > 0,
        )
        if self.tasks:
            tokenizer = getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise MisconfigurationException("PruningReport with `tasks` needs the module's `tokenizer`")
            summary.zeroshot = zero_shot(
                pl_module,
                tokenizer,
                self.tasks,
                limit=self.limit,
                batch_size=self.zeroshot_batch_size,
                data_dir=self.data_dir,
            )
        pl_module.train(was_training)
        if trainer.logger is not None:
            trainer.logger.log_metrics(_headline(summary, name), step=trainer.global_step)
        return summary

    def _windows(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[torch.Tensor | None, str | None]:
        data = getattr(trainer, "datamodule", None)
        if not self.ppl:
            return None, None
        if not isinstance(data, TextDataModule) or not data.has_role("val"):
            rank_zero_warn("PruningReport: no validation text (a TextDataModule with `val_path`); perplexity skipped")
            return None, None
        if data.tokenizer is None:
            data.tokenizer = getattr(pl_module, "tokenizer", None)
        windows = data.windows("val")
        if self.max_windows is not None:
            windows = windows[: self.max_windows]
        return windows, str(data.val_path or data.path)


def _json_ready(summary: EvalSummary) -> dict[str, Any]:
    if summary.zeroshot is not None:
        summary = dataclasses.replace(summary, zeroshot=dataclasses.replace(summary.zeroshot, raw={}))
    return summary.as_dict()


def _headline(summary: EvalSummary, name: str) -> dict[str, float]:
    metrics = {f"report/{name}/params": float(summary.params.total)}
    if summary.ppl is not None:
        metrics[f"report/{name}/ppl"] = summary.ppl.ppl
    if summary.latency is not None:
        for b, ms in summary.latency.prefill_ms.items():
            metrics[f"report/{name}/prefill_ms_b{b}"] = ms
        metrics[f"report/{name}/decode_tok_s"] = summary.latency.decode_tokens_per_s
    if summary.zeroshot is not None:
        metrics[f"report/{name}/avg_acc"] = summary.zeroshot.avg
    return metrics
