"""Shared plumbing of the token data modules: tokenizer resolution, dataloaders and the calibration sample."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lit_prune._validation import check_int
from lit_prune.loading import load_tokenizer

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


class TokenDataModule(L.LightningDataModule):
    """Base of the lit-prune data modules: a tokenizer, dict batches and a seeded calibration sample.

    Subclasses implement ``_calibration_dataset`` (the examples a calibration sample is drawn from, loading them
    lazily if needed), may override ``collate``, and override ``_reset_memos`` to drop what they computed with a
    tokenizer: :meth:`_current_tokenizer` calls it when the resolved tokenizer is no longer the object the memos
    were built with (``tokenizer`` set to another object or name, or the Trainer's model changed).

    Under a Trainer with ``world_size > 1``, the validation and test loaders carry an
    ``UnrepeatedDistributedSampler`` (rank ``r`` gets examples ``r, r + world_size, ...``), which Lightning keeps as
    it is: every example is scored exactly once, so a perplexity summed over ranks equals the single-process one.
    Lightning's own ``DistributedSampler`` would repeat examples to give every rank the same count.

    Args:
        tokenizer: a tokenizer object, or a name for :func:`lit_prune.loading.load_tokenizer` (a hub id, a local
            folder, a ``.gguf`` file or ``builtin:smollm2-135m-instruct``). When None, the tokenizer of the
            LightningModule the Trainer is running (its ``.tokenizer`` attribute) is used.
        gguf_file: GGUF file name inside ``tokenizer`` when that is a folder or hub id.
        seq_len: tokens per example (window length, or maximum length for padded examples).
        batch_size: examples per batch of the train/val/test dataloaders.
        num_workers: worker processes of every dataloader.
        seed: seed of the train shuffle (and of any random split).
        calibration_windows: default number of examples drawn by :meth:`calibration_dataloader`.
        calibration_seed: default seed of :meth:`calibration_dataloader`.

    Raises:
        ValueError: if a size argument is not an int >= 1 or ``num_workers`` is not an int >= 0.
        TypeError: if ``tokenizer`` is not a string, a tokenizer or None.
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        gguf_file: str | None = None,
        seq_len: int = 256,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        calibration_windows: int = 32,
        calibration_seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("seq_len", seq_len)
        check_int("batch_size", batch_size)
        check_int("calibration_windows", calibration_windows)
        check_int("num_workers", num_workers, minimum=0)
        if tokenizer is not None and not isinstance(tokenizer, (str, PreTrainedTokenizerBase)):
            raise TypeError(
                f"`tokenizer` must be a name/path string, a PreTrainedTokenizerBase or None, got {type(tokenizer)}"
            )
        self.tokenizer = tokenizer
        self.gguf_file = gguf_file
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.calibration_windows = calibration_windows
        self.calibration_seed = calibration_seed
        self._loaded_tokenizer: PreTrainedTokenizerBase | None = None
        self._loaded_from: tuple[str, str | None] | None = None  # (name, gguf_file) of `_loaded_tokenizer`
        # The tokenizer the subclass memos were computed with. Held (not just its id) so the identity check
        # cannot be fooled by a new object reusing a freed one's address.
        self._memo_tokenizer: PreTrainedTokenizerBase | None = None

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: the object given, else the one named (loaded once per name), else the Trainer's model's.

        A name is loaded on first use and kept while ``tokenizer`` and ``gguf_file`` stay the same; setting either
        to another value loads again.

        Raises:
            ValueError: if no tokenizer was given and no Trainer-attached model with a ``.tokenizer`` exists.
        """
        if isinstance(self.tokenizer, PreTrainedTokenizerBase):
            return self.tokenizer
        if isinstance(self.tokenizer, str):
            wanted = (self.tokenizer, self.gguf_file)
            if self._loaded_tokenizer is None or self._loaded_from != wanted:
                log.info("Loading tokenizer %s", self.tokenizer)
                self._loaded_tokenizer = load_tokenizer(self.tokenizer, self.gguf_file)
                self._loaded_from = wanted
            return self._loaded_tokenizer
        trainer = self.trainer
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        from_model = getattr(module, "tokenizer", None)
        if from_model is not None:
            return from_model
        where = "its LightningModule has no `.tokenizer`" if trainer is not None else "it is not attached to a Trainer"
        raise ValueError(
            f"{type(self).__name__} has no tokenizer: pass `tokenizer=` (an object, a hub id, a folder, a .gguf file "
            f"or 'builtin:smollm2-135m-instruct'); it could not be taken from the model because {where}."
        )

    def _current_tokenizer(self) -> PreTrainedTokenizerBase:
        """:meth:`get_tokenizer`, first dropping the memos (``_reset_memos``) if they were built with another one."""
        tokenizer = self.get_tokenizer()
        if tokenizer is not self._memo_tokenizer:
            if self._memo_tokenizer is not None:
                log.info(
                    "Tokenizer changed from %s to %s: examples are tokenized again",
                    _tokenizer_name(self._memo_tokenizer),
                    _tokenizer_name(tokenizer),
                )
            self._reset_memos()
            self._memo_tokenizer = tokenizer
        return tokenizer

    def _reset_memos(self) -> None:
        """Drop everything computed with the previous tokenizer; subclasses with memos override this."""

    def collate(self, examples: list[Batch]) -> Batch:
        """Stack equal-length examples into a batch; subclasses with variable lengths pad here."""
        return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}

    def _calibration_dataset(self) -> Sequence[Batch]:
        """Examples a calibration sample is drawn from; loads them if setup has not run."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `_calibration_dataset`")

    def _loader(
        self,
        dataset: Sequence[Batch] | Dataset,
        batch_size: int,
        shuffle: bool = False,
        sampler: Sampler | None = None,
    ) -> DataLoader:
        """A DataLoader over dict examples; the shuffle order is seeded from ``seed``."""
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        collate: Callable[[list[Batch]], Any] = self.collate
        return DataLoader(
            _as_dataset(dataset),
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def _ranks(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached Trainer; ``(1, 0)`` without one."""
        trainer = self.trainer
        return int(getattr(trainer, "world_size", 1) or 1), int(getattr(trainer, "global_rank", 0) or 0)

    def _eval_loader_over(self, examples: Sequence[Batch] | Dataset, what: str) -> DataLoader:
        """An unshuffled loader for validation/test that scores every example exactly once across ranks.

        Under a Trainer with ``world_size > 1`` it carries an ``UnrepeatedDistributedSampler`` (Lightning keeps a
        sampler that already is a ``DistributedSampler``). With fewer examples than ranks some rank would get no
        batch and the ranks' metric syncs would not match up, so Lightning's repeating sampler is left in place
        with a warning.
        """
        dataset = _as_dataset(examples)
        n = len(dataset)  # type: ignore[arg-type]  # map-style datasets here always have a length
        world_size, rank = self._ranks()
        sampler: Sampler | None = None
        if world_size > 1:
            if n >= world_size:
                sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
            else:
                rank_zero_warn(
                    f"{type(self).__name__}: {n} {what} examples for {world_size} ranks; Lightning's "
                    f"DistributedSampler will repeat some so that every rank gets one, and metrics summed over "
                    f"ranks count them twice. Use at most {n} devices or more examples.",
                    category=UserWarning,
                )
        return self._loader(dataset, self.batch_size, sampler=sampler)

    def calibration_dataloader(
        self, n: int | None = None, seed: int | None = None, batch_size: int | None = None, distributed: bool = True
    ) -> DataLoader:
        """``n`` distinct calibration examples, drawn without replacement by a seeded generator, in dict batches.

        The same ``(n, seed)`` always gives the same examples in the same order; the data is set up lazily. Under
        a Trainer with ``world_size > 1`` (and ``distributed=True``) the sample is split without repetition across
        ranks, as an ``UnrepeatedDistributedSampler`` would: rank ``r`` gets the drawn examples
        ``r, r + world_size, ...`` (none when ``n < world_size``), so statistics summed over ranks cover the sample
        exactly once.

        Args:
            n: number of examples; default ``calibration_windows``.
            seed: seed of the draw; default ``calibration_seed``.
            batch_size: examples per batch; default ``batch_size``.
            distributed: split the sample across the Trainer's ranks; False gives every rank the whole sample.

        Raises:
            ValueError: if ``n`` or ``batch_size`` is not an int >= 1, or ``n`` exceeds the examples available.
        """
        n = self.calibration_windows if n is None else n
        seed = self.calibration_seed if seed is None else seed
        batch_size = self.batch_size if batch_size is None else batch_size
        check_int("n", n)
        check_int("batch_size", batch_size)
        dataset = self._calibration_dataset()
        if n > len(dataset):
            raise ValueError(
                f"`n`={n} calibration examples requested, but the calibration data has only {len(dataset)}"
            )
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        world_size, rank = self._ranks() if distributed else (1, 0)
        if world_size > 1:
            indices = indices[rank::world_size]
            log.info("Calibration sample: rank %d of %d gets %d of the %d examples", rank, world_size, len(indices), n)
        log.info("Calibration sample: %d of %d examples (seed %d)", n, len(dataset), seed)
        return self._loader(Subset(_as_dataset(dataset), indices), batch_size)


class _ListDataset(Dataset):
    """A map-style dataset over an in-memory sequence of examples."""

    def __init__(self, items: Sequence[Batch]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Batch:
        return self.items[index]


def _tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """``ClassName('name_or_path')`` for log lines."""
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '')!r})"


def _as_dataset(items: Sequence[Batch] | Dataset) -> Dataset:
    """Wrap a sequence as a ``Dataset`` (datasets pass through)."""
    return items if isinstance(items, Dataset) else _ListDataset(items)
