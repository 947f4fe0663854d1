"""Text sources (local files or Hugging Face datasets) tokenized once into a token stream cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from lit_prune.presets import resolve_data_uri

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".parquet", ".raw", ".txt")
# Suffixes that mark a location as a file path (so a missing one is an error, not a dataset name).
_FILE_SUFFIXES = {*SUPPORTED_SUFFIXES, ".json", ".csv", ".tsv", ".text", ".arrow", ".gz", ".bz2", ".xz", ".zst"}
_CACHE_FORMAT = 1

SourceKind = Literal["text", "jsonl", "parquet", "hf"]


def default_cache_dir() -> Path:
    """``$LIT_PRUNE_CACHE`` when set, else ``~/.cache/lit_prune/tokens``."""
    env = os.environ.get("LIT_PRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lit_prune" / "tokens"


def _looks_like_file(location: str) -> bool:
    """True for a file-like path; False for something that reads as a dataset name such as ``owner/name``."""
    if Path(location).suffix.lower() in _FILE_SUFFIXES:
        return True
    return location.startswith(("/", "./", "../", "~")) or "\\" in location or location.count("/") > 1


@dataclass
class TextSource:
    """Where one role's text comes from: a local file, or a split of a Hugging Face dataset.

    Attributes:
        arg: the constructor argument the location came from (used in error messages), e.g. ``"val_path"``.
        location: the path or dataset name as given.
        kind: ``"text"`` (``.txt``/``.raw``), ``"jsonl"``, ``"parquet"`` or ``"hf"``.
        text_field: JSON key / column holding the text (not used for plain text files).
        dataset_config: configuration name for ``datasets.load_dataset`` (``"hf"`` only).
        split: split name for ``datasets.load_dataset`` (``"hf"`` only).
    """

    arg: str
    location: str
    kind: SourceKind
    text_field: str = "text"
    dataset_config: str | None = None
    split: str | None = None
    _dataset: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """Short name for log lines: the file name, or ``dataset[config]:split``."""
        if self.kind != "hf":
            return Path(self.location).name
        config = f"[{self.dataset_config}]" if self.dataset_config else ""
        return f"{self.location}{config}:{self.split}"

    def describe(self) -> str:
        """The source as error messages name it, e.g. ``"`val_path` file 'x/wiki.test.raw'"``."""
        if self.kind != "hf":
            return f"`{self.arg}` file {self.location!r}"
        config = f", config {self.dataset_config!r}" if self.dataset_config else ""
        return f"`{self.arg}` dataset {self.location!r} (split {self.split!r}{config})"

    def identity(self) -> dict[str, Any]:
        """What the cached tokens depend on: the resolved file with its size and mtime, or the dataset split."""
        if self.kind != "hf":
            stat = Path(self.location).stat()
            resolved = str(Path(self.location).resolve())
            return {"file": resolved, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "field": self.text_field}
        dataset = self._load_dataset()
        return {
            "dataset": self.location,
            "config": self.dataset_config,
            "split": self.split,
            "field": self.text_field,
            "fingerprint": getattr(dataset, "_fingerprint", None),
        }

    def read_text(self) -> str:
        """The whole text: a plain file as is; records (JSONL lines, parquet rows, dataset rows) joined by blank lines.

        Raises:
            ValueError: if a record lacks ``text_field`` or holds a non-string, or a line is not valid JSON.
        """
        if self.kind == "text":
            return Path(self.location).read_text(encoding="utf-8")
        if self.kind == "jsonl":
            return "\n\n".join(self._jsonl_texts())
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(self.location).names
            self._check_field(columns)
            texts = pq.read_table(self.location, columns=[self.text_field]).column(self.text_field).to_pylist()
        else:
            dataset = self._load_dataset()
            self._check_field(list(dataset.column_names))
            texts = list(dataset[self.text_field])
        return "\n\n".join(self._check_str(i, text) for i, text in enumerate(texts))

    def _jsonl_texts(self) -> list[str]:
        texts = []
        with open(self.location, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.describe()} line {lineno} is not valid JSON: {err}") from err
                if not isinstance(record, dict) or self.text_field not in record:
                    raise ValueError(
                        f"{self.describe()} line {lineno} has no {self.text_field!r} field; set `text_field=` "
                        f"to the key holding the text"
                    )
                texts.append(self._check_str(lineno, record[self.text_field], what="line"))
        return texts

    def _check_field(self, columns: list[str]) -> None:
        if self.text_field not in columns:
            raise ValueError(
                f"{self.describe()} has no column {self.text_field!r}; columns are {columns}. Set `text_field=`."
            )

    def _check_str(self, index: int, text: Any, what: str = "record") -> str:
        if not isinstance(text, str):
            raise ValueError(f"{self.describe()} {what} {index}: {self.text_field!r} must be a string, got {text!r}")
        return text

    def _load_dataset(self) -> Any:
        if self._dataset is None:
            import datasets

            log.info("Loading dataset %s", self.name)
            try:
                self._dataset = datasets.load_dataset(self.location, self.dataset_config, split=self.split)
            except ValueError as err:
                raise ValueError(
                    f"Could not load {self.describe()}: {err}. If the dataset has no such split, "
                    f"set the matching `*_split=` argument (or pass an explicit path)."
                ) from err
        return self._dataset


def resolve_source(
    location: str,
    arg: str,
    text_field: str = "text",
    dataset_config: str | None = None,
    split: str | None = None,
) -> TextSource:
    """Decide what ``location`` is: an existing local file, a missing file (error) or a dataset name.

    Args:
        location: a local ``.txt``/``.raw``/``.jsonl``/``.parquet`` file (``data://...`` for the shared data
            folder, see :func:`lit_prune.presets.resolve_data_uri`), a local dataset folder or a hub dataset.
        arg: the constructor argument it came from, for error messages.
        text_field: JSON key / column of the text.
        dataset_config: dataset configuration name (datasets only).
        split: dataset split (datasets only).

    Raises:
        FileNotFoundError: if ``location`` looks like a file path but does not exist.
        ValueError: if it is an existing file with an unsupported suffix.
    """
    location = resolve_data_uri(location, arg)
    path = Path(location).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            raise ValueError(
                f"`{arg}` file {location!r} has unsupported suffix {suffix!r}; supported: {list(SUPPORTED_SUFFIXES)} "
                f"(or a Hugging Face dataset name)"
            )
        kind: SourceKind = "text" if suffix in (".txt", ".raw") else "jsonl" if suffix == ".jsonl" else "parquet"
        return TextSource(arg=arg, location=str(path), kind=kind, text_field=text_field)
    if not path.is_dir() and _looks_like_file(location):
        raise FileNotFoundError(f"`{arg}` file {location!r} does not exist")
    return TextSource(
        arg=arg, location=location, kind="hf", text_field=text_field, dataset_config=dataset_config, split=split
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What the token ids depend on: class, name, vocabulary size and a hash of the full tokenizer definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # the full tokenizer JSON when there is one (vocab, merges, normalizer...), else the vocabulary
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "definition": hashlib.sha256(definition.encode("utf-8")).hexdigest(),
    }


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenize ``text`` as one stream without special tokens, as a 1-D int32 tensor."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int32)


def load_tokens(source: TextSource, tokenizer: PreTrainedTokenizerBase, cache_dir: str | Path) -> torch.Tensor:
    """The 1-D token stream of ``source``, read from the disk cache or tokenized once and cached atomically.

    The cache key hashes the tokenizer (:func:`tokenizer_fingerprint`) and the source identity (file path, size and
    mtime, or dataset name/config/split/fingerprint), so editing a file or changing the tokenizer re-tokenizes.

    Raises:
        ValueError: if the source has no text.
    """
    key_fields = {"format": _CACHE_FORMAT, "tokenizer": tokenizer_fingerprint(tokenizer), "source": source.identity()}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode("utf-8")).hexdigest()
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.name)[:60]
    cache_file = Path(cache_dir).expanduser() / f"{stem}-{key[:24]}.pt"
    if cache_file.is_file():
        try:
            tokens = torch.load(cache_file, weights_only=True)["tokens"]
            log.info("%s: %s tokens read from cache %s", source.name, f"{tokens.numel():,}", cache_file)
            return tokens
        except Exception as err:  # a truncated or foreign file: re-tokenize and overwrite it
            log.warning("Ignoring unreadable token cache %s (%s)", cache_file, err)
    text = source.read_text()
    if not text.strip():
        raise ValueError(f"{source.describe()} is empty: 0 tokens, no text to tokenize")
    start = time.perf_counter()
    tokens = tokenize_text(tokenizer, text)
    log.info(
        "%s: tokenized %s characters into %s tokens in %.1fs",
        source.name,
        f"{len(text):,}",
        f"{tokens.numel():,}",
        time.perf_counter() - start,
    )
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"tokens": tokens, "source": source.name}, f)
        os.replace(tmp, cache_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tokens
