"""Language-modelling data: a text tokenized as one stream and cut into non-overlapping windows."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from typing_extensions import override

from lit_prune._validation import check_int
from lit_prune.datamodules.base import Batch, TokenDataModule
from lit_prune.datamodules.sources import TextSource, default_cache_dir, load_tokens, resolve_source

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test", "calibration")
_ARGS = {"train": "path", "val": "val_path", "test": "test_path", "calibration": "calibration_path"}
_STAGE_ROLES: dict[str | None, tuple[str, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": (),
    None: ROLES,
}


def window_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id ``tokenizer`` puts before every text it encodes (Gemma, LLaMA-2), or None when it adds none.

    Such models are trained with a BOS at position 0 and score much worse without one, so every window starts with
    it (SmolLM2's tokenizer adds none: its windows are plain slices of the stream).
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


class _WindowDataset(Dataset):
    """Rows of an ``(N, seq_len)`` tensor as ``{"input_ids": (seq_len,)}`` examples."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> Batch:
        return {"input_ids": self.windows[index]}


class TextDataModule(TokenDataModule):
    r"""Text tokenized once as a single stream, cut into non-overlapping ``seq_len`` windows, cached on disk.

    Each source is a local ``.txt``/``.raw`` file (its whole content is one text), a ``.jsonl`` file (one JSON
    object per line, text under ``text_field``), a ``.parquet`` file (column ``text_field``), or a Hugging Face
    dataset name loaded with ``datasets.load_dataset(name, dataset_config, split=...)``. Records are joined with
    blank lines (``"\n\n"``) before tokenizing without special tokens; the incomplete tail window is dropped. When
    the tokenizer adds a BOS to what it encodes (Gemma), every window is that BOS and ``seq_len - 1`` stream tokens.
    Batches are ``{"input_ids": LongTensor(batch, seq_len)}`` with no padding: the tokens are their own labels.

    The token stream of each source (not its windows) is cached under ``cache_dir``. The cache key is the SHA-256
    of exactly three things: the cache format version; the tokenizer (class, ``name_or_path``, ``len(tokenizer)``
    and the SHA-256 of its backend definition JSON without the ``truncation``/``padding`` state, or of its
    vocabulary when it has no backend); and the source (for a file: its kind, ``text_field``, size and the SHA-256
    of its content; for a dataset: name, config, split, ``text_field`` and the ``datasets`` fingerprint). Neither
    ``seq_len`` nor ``max_*_windows`` nor a file's path or mtime is part of it: windows are cut on read, the same
    content anywhere reuses the cache, and any edit of a file is tokenized again. ``prepare_data`` (run by
    Lightning on one process per node) fills the cache, so ``setup`` on the other ranks only reads it.

    Args:
        path: training text (file or dataset name). A dataset given only here also supplies val, test and
            calibration data from its ``val_split``/``test_split``/``calibration_split``.
        val_path: validation text; default the ``val_split`` of a ``path`` dataset, else none (no val loop).
        test_path: test text; default the ``test_split`` of a ``path`` dataset, else none.
        calibration_path: text the calibration windows are drawn from; default ``path``, else ``val_path``.
        text_field: JSON key / column holding the text (``.jsonl``, ``.parquet``, datasets).
        dataset_config: configuration name passed to ``datasets.load_dataset`` (e.g. ``"wikitext-2-raw-v1"``).
        train_split: dataset split for training.
        val_split: dataset split for validation; None to take no validation data from a ``path`` dataset.
        test_split: dataset split for testing; None to take no test data from a ``path`` dataset.
        calibration_split: dataset split for calibration; default ``train_split`` (``val_split`` when the
            calibration data falls back to ``val_path``).
        tokenizer: a tokenizer object or a name for :func:`lit_prune.loading.load_tokenizer`; None to use the
            ``.tokenizer`` of the LightningModule being trained.
        gguf_file: GGUF file name inside ``tokenizer`` when that is a folder or hub id.
        seq_len: tokens per window.
        batch_size: windows per batch.
        shuffle: shuffle the training windows (seeded by ``seed``); val/test/calibration are never shuffled.
        num_workers: dataloader worker processes.
        seed: seed of the training shuffle.
        max_train_windows: use only the first N training windows; None for all.
        max_val_windows: use only the first N windows of the val and test texts (e.g. the "first 32 windows"
            evaluation protocol); None for all.
        calibration_windows: default number of windows drawn by :meth:`calibration_dataloader`.
        calibration_seed: default seed of the calibration draw.
        cache_dir: folder of the token cache; default ``$LIT_PRUNE_CACHE`` or ``~/.cache/lit_prune/tokens``.

    Raises:
        FileNotFoundError: when a role is first used (setup, a dataloader, :meth:`windows`) and its path looks like
            a local file but does not exist. The check waits until then so that, e.g., ``validate`` runs from a
            config whose training file is absent.
        ValueError: if a file has an unsupported suffix, or a size argument is not an int >= 1. At setup: if a text
            is empty or shorter than one window.

    Example::

        >>> dm = TextDataModule(  # doctest: +SKIP
        ...     val_path="shared/data/wikitext2/wiki.test.raw", tokenizer="builtin:smollm2-135m-instruct",
        ...     seq_len=256, max_val_windows=32)
        >>> dm.setup("validate")  # doctest: +SKIP
        >>> dm.windows("val").shape  # doctest: +SKIP
        torch.Size([32, 256])
    """

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        calibration_path: str | None = None,
        text_field: str = "text",
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        test_split: str | None = "test",
        calibration_split: str | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        gguf_file: str | None = None,
        seq_len: int = 256,
        batch_size: int = 4,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
        max_train_windows: int | None = None,
        max_val_windows: int | None = None,
        calibration_windows: int = 32,
        calibration_seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            gguf_file=gguf_file,
            seq_len=seq_len,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            calibration_windows=calibration_windows,
            calibration_seed=calibration_seed,
        )
        check_int("max_train_windows", max_train_windows, allow_none=True)
        check_int("max_val_windows", max_val_windows, allow_none=True)
        self.path, self.val_path, self.test_path, self.calibration_path = path, val_path, test_path, calibration_path
        self.text_field = text_field
        self.dataset_config = dataset_config
        self.shuffle = shuffle
        self.max_train_windows = max_train_windows
        self.max_val_windows = max_val_windows
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

        def source(location: str | None, arg: str, split: str | None) -> TextSource | FileNotFoundError | None:
            if location is None:
                return None
            try:
                src = resolve_source(location, arg, text_field=text_field, dataset_config=dataset_config, split=split)
            except FileNotFoundError as err:
                return err  # raised when the role is used, so e.g. `validate` works without the training file
            if src.kind == "hf" and split is None:
                raise ValueError(f"`{arg}` names a dataset ({location!r}) but its split is None: set the `*_split=`")
            return src

        train = source(path, "path", train_split)
        from_path = isinstance(train, TextSource) and train.kind == "hf"  # a dataset in `path` gives other splits
        self._sources: dict[str, TextSource | FileNotFoundError | None] = {
            "train": train,
            "val": source(val_path, "val_path", val_split)
            if val_path is not None
            else (source(path, "path", val_split) if from_path and val_split else None),
            "test": source(test_path, "test_path", test_split)
            if test_path is not None
            else (source(path, "path", test_split) if from_path and test_split else None),
        }
        if calibration_path is not None:
            split = calibration_split or train_split
            self._sources["calibration"] = source(calibration_path, "calibration_path", split)
        elif path is not None:
            self._sources["calibration"] = source(path, "path", calibration_split or train_split)
        else:
            self._sources["calibration"] = source(val_path, "val_path", calibration_split or val_split)
        # Memos, valid for the tokenizer in `_memo_tokenizer` only (`_reset_memos` clears them when it changes).
        self._windows: dict[tuple[str, int, int | None, int | None], torch.Tensor] = {}
        self._streams: dict[tuple[str, str | None, str], torch.Tensor] = {}

    @override
    def _reset_memos(self) -> None:
        self._windows.clear()
        self._streams.clear()

    def has_role(self, role: str) -> bool:
        """Whether a source was configured for ``role`` (one of ``train``, ``val``, ``test``, ``calibration``)."""
        self._check_role(role)
        return self._sources[role] is not None

    def windows(self, role: str) -> torch.Tensor:
        """The ``(N, seq_len)`` LongTensor of windows of ``role``, tokenizing (or reading the cache) on first use.

        The windows are remembered for the tokenizer they were cut with; after ``tokenizer`` changes (another
        object or name, or another model's tokenizer) they are computed again.

        Args:
            role: one of ``"train"``, ``"val"``, ``"test"``, ``"calibration"``.

        Raises:
            FileNotFoundError: if the file of ``role`` does not exist.
            ValueError: if ``role`` is unknown, has no source, its text is shorter than one window, or there is
                no tokenizer.
        """
        self._check_role(role)
        source = self._sources[role]
        if source is None:
            what = "training" if role == "train" else role
            raise ValueError(f"{type(self).__name__} has no {what} text: pass `{_ARGS[role]}=`")
        if isinstance(source, FileNotFoundError):
            raise source
        tokenizer = self._current_tokenizer()  # clears the memos if the tokenizer changed
        # keyed by what the cut depends on, so changing seq_len or a window limit after a first use re-cuts
        key = (role, self.seq_len, self.max_train_windows, self.max_val_windows)
        if key not in self._windows:
            self._windows[key] = self._cut(role, source, tokenizer)
        return self._windows[key]

    def _check_role(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"`role` must be one of {list(ROLES)}, got {role!r}")

    def _stream(self, source: TextSource, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        """The ``(T,)`` int32 token stream of ``source``: memo, else disk cache, else tokenized and cached."""
        memo = (source.location, source.split, source.text_field)
        if memo not in self._streams:
            self._streams[memo] = load_tokens(source, tokenizer, self.cache_dir)
        return self._streams[memo]

    def _cut(self, role: str, source: TextSource, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
        tokens = self._stream(source, tokenizer)  # (T,) int32
        bos = window_bos(tokenizer)
        body = self.seq_len - (bos is not None)  # a tokenizer that adds a BOS gets one at the start of each window
        n = tokens.numel() // body if body > 0 else 0
        if n == 0:
            raise ValueError(
                f"{source.describe()} has {tokens.numel()} tokens, but one window needs `seq_len`={self.seq_len}"
                + (" (one of them the BOS the tokenizer adds)" if bos is not None else "")
            )
        windows = tokens[: n * body].view(n, body).long()  # (N, body)
        if bos is not None:
            windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)  # (N, seq_len)
        limit = self.max_train_windows if role == "train" else self.max_val_windows if role in ("val", "test") else None
        if limit is not None:
            windows = windows[:limit]
        log.info(
            "%s text %s: %s tokens -> %d windows of %d (using %d)",
            role,
            source.name,
            f"{tokens.numel():,}",
            n,
            self.seq_len,
            windows.shape[0],
        )
        return windows

    @override
    def prepare_data(self) -> None:
        """Tokenize the texts the Trainer's stage needs (all configured ones without a Trainer) into the disk cache.

        Lightning calls this on one process per node before ``setup``, so the other ranks read the cache instead of
        tokenizing too. Roles without a source, or whose file is missing, are skipped: ``setup`` raises for those
        the stage needs. Texts too short for one window are cached as well; ``setup`` reports them.

        Raises:
            ValueError: if there is no tokenizer, or a text needed by the stage is empty or malformed.
        """
        fn = getattr(getattr(self.trainer, "state", None), "fn", None)
        stage = None if fn is None else str(getattr(fn, "value", fn))
        roles = _STAGE_ROLES.get(stage, ())
        sources = [s for s in (self._sources[role] for role in roles) if isinstance(s, TextSource)]
        if not sources:
            return
        tokenizer = self._current_tokenizer()
        for source in sources:
            self._stream(source, tokenizer)

    @override
    def setup(self, stage: str | None = None) -> None:
        """Tokenize (or read from the cache) the texts ``stage`` needs: fit → train+val, validate → val, test → test.

        Raises:
            ValueError: for ``fit`` without training text, or a text shorter than one window.
        """
        for role in _STAGE_ROLES.get(stage, ()):
            if self._sources[role] is not None or (role == "train" and stage == "fit"):
                self.windows(role)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(_WindowDataset(self.windows("train")), self.batch_size, shuffle=self.shuffle)

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loader("val")

    @override
    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return self._eval_loader("test")

    def _eval_loader(self, role: str) -> DataLoader | list[DataLoader]:
        if self._sources[role] is None:
            return []  # Lightning skips a loop without dataloaders
        return self._eval_loader_over(_WindowDataset(self.windows(role)), role)

    @override
    def _calibration_dataset(self) -> list[Batch]:
        return [{"input_ids": row} for row in self.windows("calibration")]
