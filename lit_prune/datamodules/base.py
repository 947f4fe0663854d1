"""Shared plumbing of the token data modules: tokenizer resolution, dataloaders and the calibration sample."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lit_prune.loading import load_tokenizer

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive int (or None when ``allow_none``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        allowed = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}")


class TokenDataModule(L.LightningDataModule):
    """Base of the lit-prune data modules: a tokenizer, dict batches and a seeded calibration sample.

    Subclasses implement ``_calibration_dataset`` (the examples a calibration sample is drawn from, loading them
    lazily if needed) and may override ``collate``.

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
        ValueError: if a size argument is not a positive int or ``num_workers`` is negative.
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
        _check_positive("seq_len", seq_len)
        _check_positive("batch_size", batch_size)
        _check_positive("calibration_windows", calibration_windows)
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be an int >= 0, got {num_workers!r}")
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

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: the object given, else the one named (loaded once), else the Trainer's model's.

        Raises:
            ValueError: if no tokenizer was given and no Trainer-attached model with a ``.tokenizer`` exists.
        """
        if isinstance(self.tokenizer, PreTrainedTokenizerBase):
            return self.tokenizer
        if isinstance(self.tokenizer, str):
            if self._loaded_tokenizer is None:
                log.info("Loading tokenizer %s", self.tokenizer)
                self._loaded_tokenizer = load_tokenizer(self.tokenizer, self.gguf_file)
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

    def collate(self, examples: list[Batch]) -> Batch:
        """Stack equal-length examples into a batch; subclasses with variable lengths pad here."""
        return {key: torch.stack([ex[key] for ex in examples]) for key in examples[0]}

    def _calibration_dataset(self) -> Sequence[Batch]:
        """Examples a calibration sample is drawn from; loads them if setup has not run."""
        raise NotImplementedError(f"{type(self).__name__} does not implement `_calibration_dataset`")

    def _loader(self, dataset: Sequence[Batch] | Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        """A DataLoader over dict examples; the shuffle order is seeded from ``seed``."""
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        collate: Callable[[list[Batch]], Any] = self.collate
        return DataLoader(
            _as_dataset(dataset),
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            collate_fn=collate,
        )

    def calibration_dataloader(
        self, n: int | None = None, seed: int | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """``n`` distinct calibration examples, drawn without replacement by a seeded generator, in dict batches.

        The same ``(n, seed)`` always gives the same examples in the same order; the data is set up lazily.

        Args:
            n: number of examples; default ``calibration_windows``.
            seed: seed of the draw; default ``calibration_seed``.
            batch_size: examples per batch; default ``batch_size``.

        Raises:
            ValueError: if ``n`` or ``batch_size`` is not positive, or ``n`` exceeds the examples available.
        """
        n = self.calibration_windows if n is None else n
        seed = self.calibration_seed if seed is None else seed
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_positive("n", n)
        _check_positive("batch_size", batch_size)
        dataset = self._calibration_dataset()
        if n > len(dataset):
            raise ValueError(
                f"`n`={n} calibration examples requested, but the calibration data has only {len(dataset)}"
            )
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
        log.info("Calibration sample: %d of %d examples (seed %d)", n, len(dataset), seed)
        return self._loader(Subset(_as_dataset(dataset), indices.tolist()), batch_size)


class _ListDataset(Dataset):
    """A map-style dataset over an in-memory sequence of examples."""

    def __init__(self, items: Sequence[Batch]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Batch:
        return self.items[index]


def _as_dataset(items: Sequence[Batch] | Dataset) -> Dataset:
    """Wrap a sequence as a ``Dataset`` (datasets pass through)."""
    return items if isinstance(items, Dataset) else _ListDataset(items)
