"""Token-weighted perplexity of a causal LM over fixed token windows (the same code path as validation PPL)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lit_prune._validation import check_int
from lit_prune.eval._common import evaluating
from lit_prune.functional.perplexity import IGNORE_INDEX, labels_for
from lit_prune.metrics import Perplexity

log = logging.getLogger(__name__)

Windows = torch.Tensor | Iterable[torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity_details` measured.

    Args:
        ppl: ``exp(nll)``.
        nll: mean next-token negative log-likelihood (nats) over every scored token.
        tokens: number of scored tokens (``T - 1`` per full window, fewer where labels are ``-100``).
        windows: number of windows (rows) evaluated.
        seq_len: window length ``T`` (the longest one when batches differ).
    """

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain dict (for loggers and JSON)."""
        return asdict(self)


def _check_windows(ids: torch.Tensor, name: str = "windows") -> None:
    """Raise unless ``ids`` is a ``(N, T)`` integer tensor with ``T >= 2``."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"`{name}` must be a 2-D integer tensor (num_windows, seq_len), "
            f"got shape {tuple(ids.shape)} and dtype {ids.dtype}"
        )
    if ids.size(1) < 2:
        raise ValueError(f"`{name}` needs seq_len >= 2 to score a next token, got shape {tuple(ids.shape)}")


def _as_batch(item: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise one batch to ``input_ids``/``labels`` (and ``attention_mask`` if given), validated.

    When ``labels`` is missing it is ``input_ids``, with positions where ``attention_mask == 0`` set to ``-100``.
    """
    if isinstance(item, torch.Tensor):
        _check_windows(item, "windows batch")
        return {"input_ids": item, "labels": item}
    if not isinstance(item, Mapping) or "input_ids" not in item:
        kind = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise TypeError(f"Each batch must be a LongTensor (B, T) or a dict with `input_ids`, got {kind}")
    ids = item["input_ids"]
    _check_windows(ids, "input_ids")
    batch = {"input_ids": ids}
    mask = item.get("attention_mask")
    labels = labels_for(ids, item.get("labels"), mask)
    if tuple(labels.shape) != tuple(ids.shape):
        raise ValueError(f"`labels` must have the shape of `input_ids` {tuple(ids.shape)}, got {tuple(labels.shape)}")
    batch["labels"] = labels
    if mask is not None:
        batch["attention_mask"] = mask
    return batch


def _batches(windows: Windows, batch_size: int) -> tuple[Iterable[Any], int | None]:
    """The batches to run and their number (None when the iterable has no length)."""
    if isinstance(windows, torch.Tensor):
        _check_windows(windows)
        if windows.size(0) == 0:
            raise ValueError(f"`windows` is empty: got shape {tuple(windows.shape)}")
        return windows.split(batch_size), math.ceil(windows.size(0) / batch_size)
    try:
        total = len(windows)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return windows, total


def perplexity_details(
    model: nn.Module,
    windows: Windows,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on token windows, with the token count and mean NLL behind it.

    Every scored token weighs the same: the result is ``exp(total NLL / scored tokens)``, not a mean of per-window
    perplexities. Logits go through :class:`lit_prune.metrics.Perplexity`, the metric the Lightning module logs.

    Args:
        model: a Hugging Face causal LM, or a wrapper around one (``CausalLMModule``, PEFT model).
        windows: a LongTensor ``(N, T)``, or an iterable (e.g. a DataLoader) of LongTensors ``(B, T)`` or of dicts
            with ``input_ids`` and optional ``labels`` (``-100`` = not scored) and ``attention_mask``. Without
            ``labels``, the labels are ``input_ids`` with padded positions (``attention_mask == 0``) skipped.
        batch_size: rows per forward pass when ``windows`` is a tensor; an iterable keeps its own batching.
        device: where to run; default the model's current device. A model elsewhere is moved there and back.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`PerplexityResult`.

    Raises:
        ValueError: if ``batch_size < 1``, the windows are not 2-D integer ids with ``T >= 2``, there are none, or
            no token is scored.
        TypeError: if a batch is neither a tensor nor a dict with ``input_ids``.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> res = perplexity_details(model, torch.randint(0, 32, (3, 8)), progress=False)
        >>> res.tokens, res.windows, res.seq_len
        (21, 3, 8)
    """
    check_int("batch_size", batch_size)
    batches, total = _batches(windows, batch_size)
    metric = Perplexity()
    n_windows = seq_len = 0
    with evaluating(model, device) as (hf_model, target), torch.inference_mode():
        for item in tqdm(batches, total=total, desc="perplexity", disable=not progress, leave=False):
            batch = {k: v.to(target) for k, v in _as_batch(item).items()}
            labels = batch.pop("labels")
            logits = hf_model(**batch, use_cache=False).logits  # (B, T, V)
            metric.update(logits, labels)
            n_windows += labels.size(0)
            seq_len = max(seq_len, labels.size(1))
    if n_windows == 0:
        raise ValueError("`windows` is empty: the iterable yielded no batches")
    tokens = int(metric.count)
    if tokens == 0:
        raise ValueError(f"No token was scored in {n_windows} windows: every label is {IGNORE_INDEX}")
    ppl = float(metric.compute())
    nll = float(metric.sum_nll) / tokens
    log.debug("Perplexity %.4f (mean NLL %.5f) over %d tokens in %d windows", ppl, nll, tokens, n_windows)
    return PerplexityResult(ppl=ppl, nll=nll, tokens=tokens, windows=n_windows, seq_len=seq_len)


def perplexity(
    model: nn.Module,
    windows: Windows,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Token-weighted perplexity of ``model`` on token windows: :func:`perplexity_details` ``.ppl``.

    Args:
        model: a Hugging Face causal LM, or a wrapper around one.
        windows: a LongTensor ``(N, T)`` or an iterable of ``(B, T)`` tensors or of dicts with ``input_ids``.
        batch_size: rows per forward pass when ``windows`` is a tensor.
        device: where to run; default the model's current device.
        progress: show a tqdm progress bar.

    Returns:
        ``exp(mean next-token NLL)`` over all scored tokens.

    Raises:
        ValueError: see :func:`perplexity_details`.
        TypeError: see :func:`perplexity_details`.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> model = LlamaForCausalLM(cfg)
        >>> torch.nn.init.zeros_(model.lm_head.weight)  # uniform next-token distribution  # doctest: +ELLIPSIS
        Parameter containing:...
        >>> round(perplexity(model, torch.randint(0, 32, (2, 8)), progress=False), 4)
        32.0
    """
    return perplexity_details(model, windows, batch_size=batch_size, device=device, progress=progress).ppl
