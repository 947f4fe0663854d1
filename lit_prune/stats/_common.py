"""Shared pieces of the statistics modules: batch handling, masks, last tokens and read-only result containers."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor

Batch = Tensor | Mapping[str, Tensor]
Batches = Tensor | Iterable[Batch]

_F64 = torch.float64

_CHUNK_ELEMENTS = 1 << 24
"""Input elements cast to float64 at a time (a 128 MiB copy), so memory stays bounded for long batches.

The inputs are cast to float64 *before* the products: a product of two float32 (or bf16/fp16) values is exact in
float64, and a float64 sum over ``n`` tokens is off by at most ``n · 2⁻⁵³ · Σ |x_i x_j|`` (typically ``√n · 2⁻⁵³``),
so the sums do not depend on how the BLAS blocks the matmul, on the batch shape, the padding or the chunking
(float32 partial sums did, by ~1e-7 relative). Cost on CPU: the update takes 1.6-2.2x its float32 version (576 and
1536 features, 576-2048 tokens); a one-shot Hessian pass over a SmolLM2-shaped model went from 0.86 s to 1.17 s.
"""


def _f64_chunks(tokens: Tensor) -> Iterator[Tensor]:
    """The rows of ``tokens`` ``(N, in)`` as float64 chunks of at most :data:`_CHUNK_ELEMENTS` elements, in order.

    Every ``Σ x²`` and ``Σ x xᵀ`` of lit-prune is accumulated chunk by chunk from these (``state = state +
    chunk.square().sum(0)``), so two statistics that sum the same input agree bit for bit.
    """
    step = max(1, _CHUNK_ELEMENTS // max(1, tokens.shape[1]))
    for start in range(0, tokens.shape[0], step):
        yield tokens[start : start + step].double()


class _ReadOnly:
    """Base of the reduced-sums containers: attributes are set once in ``__init__``.

    They are plain classes, not dataclasses, on purpose: torchmetrics post-processes what ``compute()`` returns
    with ``apply_to_collection``, which rejects frozen dataclasses and squeezes one-element tensors (a 1-block
    model's ``(1,)`` sums would lose their dimension).
    """

    __slots__: tuple[str, ...] = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only (tried to set `{name}`)")

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        parts = []
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = {key: tuple(item.shape) for key, item in value.items()}
            parts.append(f"{name}={tuple(value.shape) if isinstance(value, Tensor) else value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class CKASums:
    """Linear-CKA sufficient statistics of the boundaries ``h_0 .. h_L`` over ``count`` rows (float64).

    Args:
        gram: ``(L+1, d, d)``, ``Σ h_i h_iᵀ`` per boundary.
        cross: ``(L, d, d)``, ``Σ h_i h_{i+1}ᵀ`` per block.
        colsum: ``(L+1, d)``, ``Σ h_i`` per boundary.
        count: ``(L,)``, rows (samples or tokens) seen by each block.
    """

    gram: Tensor
    cross: Tensor
    colsum: Tensor
    count: Tensor

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}={tuple(getattr(self, name).shape)}" for name in ("gram", "cross", "colsum", "count")
        )
        return f"CKASums({shapes})"


def _check_names(name: str, values: Iterable[str], allowed: tuple[str, ...]) -> frozenset[str]:
    """Validate a set of names: non-empty, every one in ``allowed``."""
    if isinstance(values, str):
        values = (values,)
    chosen = frozenset(values)
    unknown = sorted(chosen - set(allowed))
    if unknown or not chosen:
        raise ValueError(f"`{name}` must be a non-empty subset of {list(allowed)}, got {sorted(chosen)}")
    return chosen


def _last_tokens(
    attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(rows, positions)``: samples with at least one token and the position of their last non-pad token.

    Works for right and left padding: the position is that of the last 1 in ``attention_mask`` (the last
    position when there is no mask). Fully padded rows are left out.
    """
    if attention_mask is None:
        rows = torch.arange(batch, device=device)
        return rows, torch.full((batch,), seq_len - 1, device=device, dtype=torch.long)
    mask = attention_mask.to(device=device, dtype=torch.bool)
    ranks = mask * torch.arange(1, seq_len + 1, device=device)  # (B, T): 0 on padding, position + 1 elsewhere
    positions = ranks.argmax(dim=1)  # (B,)
    rows = mask.any(dim=1).nonzero().squeeze(1)  # (B',)
    return rows, positions[rows]


def _check_mask(attention_mask: Tensor | None, hidden: Tensor) -> None:
    """Raise unless the mask is None or ``(B, T)`` for ``(B, T, d)`` hidden states."""
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"`attention_mask` must have shape (batch, seq_len) = {tuple(hidden.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )


def _tokens(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The non-pad rows of ``(B, T, d)`` hidden states as ``(N, d)``."""
    if attention_mask is None:
        return hidden.reshape(-1, hidden.size(-1))
    return hidden[attention_mask.to(device=hidden.device, dtype=torch.bool)]


def _block_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor:
    """The hidden states a block received: its first positional argument or ``hidden_states``."""
    return args[0] if args else kwargs["hidden_states"]


def _block_output(output: Any) -> Tensor:
    """The hidden states a block returned: a tensor, or the first element of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _as_inputs(item: Batch) -> tuple[Tensor, Tensor | None]:
    """``(input_ids, attention_mask or None)`` of one batch, validated."""
    if isinstance(item, Tensor):
        ids, mask = item, None
    elif isinstance(item, Mapping) and "input_ids" in item:
        ids, mask = item["input_ids"], item.get("attention_mask")
    else:
        kind = sorted(item) if isinstance(item, Mapping) else type(item).__name__
        raise TypeError(f"Each batch must be a LongTensor (B, T) or a dict with `input_ids`, got {kind}")
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        got = f"shape {tuple(ids.shape)} and dtype {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"`input_ids` must be a 2-D integer tensor (batch, seq_len), got {got}")
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(
            f"`attention_mask` must have the shape of `input_ids` {tuple(ids.shape)}, got {tuple(mask.shape)}"
        )
    return ids, mask


def _iterate(batches: Batches, max_batches: int | None) -> tuple[Iterator[Batch], int | None]:
    """The batches (a single 2-D tensor is one batch), at most ``max_batches``, and their number if known."""
    items: Iterable[Batch] = [batches] if isinstance(batches, Tensor) else batches
    try:
        total: int | None = len(items)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return islice(items, max_batches), total
