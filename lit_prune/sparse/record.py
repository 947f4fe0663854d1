"""What a sparsity plan records: the config as plain data, a digest of the calibration tokens and of the masks.

:func:`~lit_prune.sparse.prune_sparse` builds the record (:func:`sparsity_record`, its result's ``record``) and
:func:`~lit_prune.sparse.replay_sparsity` checks a replay against it, so a :class:`~lit_prune.plan.PruningPlan` with a
``sparsity`` record re-computes the same masks or says why it cannot (see :data:`lit_prune.plan.SPARSITY_KEYS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lit_prune.sparse.config import SparsityConfig
from lit_prune.stats._common import Batches, _as_inputs, _iterate


def config_record(config: SparsityConfig) -> dict[str, Any]:
    """Every field of ``config`` as plain JSON data: ``n_m`` as ``"N:M"``, ``dsa_function`` as its string.

    ``SparsityConfig(**config_record(config)) == config`` (up to ``dsa_function``'s spelling).

    Example:
        >>> record = config_record(SparsityConfig(criterion="sparsegpt", n_m="2:4"))
        >>> record["n_m"], record["dsa_function"], SparsityConfig(**record).n_m
        ('2:4', 'log|log|abs|geomean|cos|exp', (2, 4))
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "n_m":
            value = None if config.pattern is None else f"{config.pattern[0]}:{config.pattern[1]}"
        elif f.name == "dsa_function":
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def reiterable(batches: Batches | None) -> Batches | None:
    """``batches`` itself if it can be read more than once (a list, a DataLoader, a tensor), else a list of it."""
    if batches is None or isinstance(batches, Tensor):
        return batches
    if isinstance(batches, Iterator):  # a generator: read once, so keep it
        return list(batches)
    return batches


def calibration_digest(batches: Batches, max_batches: int | None = None) -> dict[str, Any]:
    """How many batches, sequences and tokens ``batches`` holds (the first ``max_batches``) and their SHA-256.

    The digest covers every batch's ``input_ids`` (shape and values) and ``attention_mask`` if given, in order, so
    the same calibration windows in the same batches give the same digest on any machine.

    Raises:
        TypeError: if a batch is neither a 2-D token tensor nor a dict with ``input_ids``.
        ValueError: if ``input_ids`` is not a 2-D integer tensor, or a mask's shape differs from it.
    """
    items, _ = _iterate(batches, max_batches)
    digest = hashlib.sha256()
    n_batches = sequences = tokens = 0
    for item in items:
        ids, mask = _as_inputs(item)
        ids = ids.detach().to("cpu", torch.int64).contiguous()  # (B, T)
        digest.update(repr(tuple(ids.shape)).encode())
        digest.update(ids.numpy().tobytes())
        if mask is not None:
            mask = mask.detach().to("cpu", torch.int64).contiguous()  # (B, T)
            digest.update(b"attention_mask")
            digest.update(mask.numpy().tobytes())
            tokens += int(mask.ne(0).sum())
        else:
            tokens += ids.numel()
        n_batches += 1
        sequences += ids.shape[0]
    return {"batches": n_batches, "sequences": sequences, "tokens": tokens, "sha256": digest.hexdigest()}


def ranks_digest(digest: Mapping[str, Any]) -> dict[str, Any]:
    """One digest of every DDP rank's calibration (this rank's ``digest`` when not distributed).

    Counts are summed and the SHA-256 is taken over the ranks' digests in rank order, so every rank records the same
    calibration. Every rank must call it. A plan made on several ranks therefore replays only on the same sharded
    calibration.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(digest)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dict(digest))
    combined = hashlib.sha256("".join(d["sha256"] for d in gathered).encode()).hexdigest()
    return {key: sum(int(d[key]) for d in gathered) for key in ("batches", "sequences", "tokens")} | {
        "sha256": combined
    }


def masks_digest(masks: Mapping[str, Tensor]) -> str | None:
    """SHA-256 of keep masks (names, shapes and values, in name order), or None when there are none."""
    if not masks:
        return None
    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name].detach().to("cpu", torch.uint8).contiguous()
        digest.update(f"{name}:{tuple(mask.shape)}".encode())
        digest.update(mask.numpy().tobytes())
    return digest.hexdigest()


def sparsity_record(
    config: SparsityConfig,
    masks: Mapping[str, Tensor],
    counts: Mapping[str, int],
    *,
    max_batches: int | None,
    calibration: dict[str, Any] | None,
    masks_before: str | None,
) -> dict[str, Any]:
    """A plan's ``sparsity`` record (:data:`lit_prune.plan.SPARSITY_KEYS`) for masks ``prune_sparse`` just made.

    Args:
        config: the options the masks were made with.
        masks: ``{linear name: keep mask}`` as attached.
        counts: ``{linear name: weights zeroed}``.
        max_batches: the calibration batches read (None: all).
        calibration: :func:`calibration_digest` of the batches, or None when none were read.
        masks_before: :func:`masks_digest` of the masks the model carried before, or None.
    """
    return {
        "config": config_record(config),
        "linears": {name: counts[name] / mask.numel() for name, mask in masks.items()},
        "max_batches": max_batches,
        "calibration": calibration,
        "masks_sha256": masks_digest(masks),
        "masks_before_sha256": masks_before,
    }
