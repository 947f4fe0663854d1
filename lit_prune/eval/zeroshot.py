"""Zero-shot multiple-choice accuracy of an in-memory causal LM through lm-eval, on local task files.

The model object goes straight into lm-eval's ``HFLM`` (no save and reload), so pruned, PEFT-wrapped and merged
models are scored as they are in memory. The local tasks (:data:`lit_prune.eval.tasks.LOCAL_TASKS`) follow
lm-eval 0.4.13's own task definitions; see :mod:`lit_prune.eval.tasks` for the files and the deviations. Other
names are passed to lm-eval's ``TaskManager`` as stock tasks (these need their Hugging Face datasets, so the
network or a populated cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_prune.eval._common import evaluating
from lit_prune.eval.tasks import LOCAL_TASKS, task_config

log = logging.getLogger(__name__)

DEFAULT_TASKS: tuple[str, ...] = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")


@dataclass
class ZeroShotResult:
    """Per-task zero-shot scores.

    ``avg`` is the mean over tasks of ``acc`` (not ``acc_norm``, which not every task has).
    """

    acc: dict[str, float]
    """Accuracy per task (argmax of the summed continuation log-likelihoods)."""
    acc_norm: dict[str, float]
    """Length-normalized accuracy, for the tasks whose lm-eval definition reports it."""
    n_items: dict[str, int]
    """Items scored per task."""
    seconds: float
    """Wall time of the evaluation."""
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    """lm-eval's ``results`` dict, per task."""

    @property
    def avg(self) -> float:
        """Mean ``acc`` over the tasks."""
        return sum(self.acc.values()) / len(self.acc) if self.acc else float("nan")


def _hf_model(model: nn.Module) -> nn.Module:
    """The object to hand to HFLM: the model itself if it has a ``config`` (HF or PEFT), else its ``.model``."""
    for _ in range(8):
        if hasattr(model, "config"):
            return model
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    raise TypeError(f"`model` must be a Hugging Face causal LM or wrap one in `.model`, got {type(model).__name__}")


def _build_task_dict(tasks: Sequence[str], data_dir: str | Path | None, limit: int | None) -> dict[str, Any]:
    from lm_eval.api.task import ConfigurableTask

    task_dict: dict[str, Any] = {}
    stock = [t for t in tasks if t not in LOCAL_TASKS]
    for name in tasks:
        if name in LOCAL_TASKS:
            task_dict[name] = ConfigurableTask(config=task_config(name, data_dir, limit))
    if stock:
        from lm_eval.tasks import TaskManager

        manager = TaskManager()
        unknown = [t for t in stock if t not in manager.all_tasks]
        if unknown:
            raise ValueError(
                f"`tasks` must be local tasks {list(LOCAL_TASKS)} or lm-eval task names, got unknown {unknown}"
            )
        task_dict.update(manager.load_task_or_group(stock))
    return task_dict


def zero_shot(
    model: nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | None = None,
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    device: str | torch.device | None = None,
) -> ZeroShotResult:
    """Zero-shot accuracy of ``model`` on multiple-choice tasks, through lm-eval's ``HFLM``.

    Args:
        model: a Hugging Face causal LM, a PEFT wrapper around one, or a module holding one in ``.model``
            (``CausalLMModule``). Its train/eval mode (and device, if ``device`` moves it) is restored after.
        tokenizer: the model's Hugging Face tokenizer.
        tasks: local task names (:data:`lit_prune.eval.tasks.LOCAL_TASKS`) or stock lm-eval task names.
        limit: score only the first ``limit`` items of each task (deterministic); None scores all.
        batch_size: lm-eval batch size.
        data_dir: folder with the local benchmark files; None uses :func:`lit_prune.presets.data_root`.
        device: where to run; None keeps the model where it is.

    Returns:
        A :class:`ZeroShotResult`; ``avg`` is the mean ``acc`` over ``tasks``.

    Raises:
        ValueError: if ``tasks`` is empty or names an unknown task, or ``limit``/``batch_size`` is not positive.
        FileNotFoundError: if a local task's file is missing (the message names the path and $LIT_PRUNE_DATA_DIR).

    Example::

        result = zero_shot(module.model, module.tokenizer, tasks=("piqa", "arc_easy"), limit=20)
        result.acc, result.avg  # per-task accuracy, mean accuracy over the tasks
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ValueError(f"`tasks` must name at least one task, e.g. {list(LOCAL_TASKS)}, got {tasks!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"`limit` must be a positive integer or None, got {limit!r}")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    task_dict = _build_task_dict(tasks, data_dir, limit)
    start = time.perf_counter()
    with evaluating(model, device):
        lm = HFLM(pretrained=_hf_model(model), tokenizer=tokenizer, batch_size=batch_size)
        with torch.no_grad():
            out = evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=False)
    seconds = time.perf_counter() - start
    if out is None:  # only on non-zero ranks
        raise RuntimeError("lm-eval returned no results (not rank 0?)")

    acc: dict[str, float] = {}
    acc_norm: dict[str, float] = {}
    n_items: dict[str, int] = {}
    raw: dict[str, Any] = dict(out["results"])
    for name, metrics in raw.items():
        if "acc,none" not in metrics:
            continue
        acc[name] = float(metrics["acc,none"])
        if "acc_norm,none" in metrics:
            acc_norm[name] = float(metrics["acc_norm,none"])
        n_items[name] = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
    log.info(
        "Zero-shot acc over %d tasks in %.1f s: %s",
        len(acc),
        seconds,
        ", ".join(f"{k}={v:.4f}" for k, v in acc.items()),
    )
    return ZeroShotResult(acc=acc, acc_norm=acc_norm, n_items=n_items, seconds=seconds, raw=raw)
