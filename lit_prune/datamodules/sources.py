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
_CACHE_FORMAT = 2  # 2: files keyed by content hash, tokenizer definition without truncation/padding state
_HASH_CHUNK = 1 << 20
# Runtime state of a fast tokenizer that `__call__` rewrites (truncation=True, padding=...): not part of its identity.
_TOKENIZER_STATE_KEYS = ("truncation", "padding")

SourceKind = Literal["text", "jsonl", "parquet", "hf"]


def default_cache_dir() -> Path:
    """``$LIT_PRUNE_CACHE`` when set, else ``~/.cache/lit_prune/tokens``."""
    env = os.environ.get("LIT_PRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lit_prune" / "tokens"


def check_file(location: str | Path, arg: str, suffixes: tuple[str, ...], hint: str = "") -> Path:
    """``location`` as a ``Path`` (``~`` expanded), after checking that it is a file with one of ``suffixes``.

    Args:
        location: the path as given.
        arg: the argument it came from, for error messages (e.g. ``"path"``).
        suffixes: allowed lower-case suffixes, with the dot.
        hint: appended to the suffix error, e.g. ``" (or a Hugging Face dataset name)"``.

    Raises:
        FileNotFoundError: if ``location`` is not an existing file.
        ValueError: if its suffix is not one of ``suffixes``.
    """
    path = Path(location).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`{arg}` file {str(location)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise ValueError(
            f"`{arg}` file {str(location)!r} has unsupported suffix {suffix!r}; supported: {list(suffixes)}{hint}"
        )
    return path


def read_jsonl(path: str | Path, describe: str) -> list[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a JSONL file; line numbers start at 1.

    Args:
        path: the ``.jsonl`` file.
        describe: how error messages name the file, e.g. ``"`path` file 'data.jsonl'"``.

    Raises:
        ValueError: naming the line number, if a line is not valid JSON.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{describe} line {lineno} is not valid JSON: {err}") from err
    return rows


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
        """What the cached tokens depend on.

        A file is identified by its content (SHA-256 and size), its kind and ``text_field``, not by its path or
        mtime, so an edit is always seen, even one that keeps the size and restores the mtime. A dataset split is
        identified by name, config, split, ``text_field`` and the ``datasets`` fingerprint.
        """
        if self.kind != "hf":
            return {
                "kind": self.kind,
                "size": Path(self.location).stat().st_size,
                "sha256": file_sha256(self.location),
                "field": self.text_field,
            }
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
        for lineno, record in read_jsonl(self.location, self.describe()):
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
        check_file(location, arg, SUPPORTED_SUFFIXES, hint=" (or a Hugging Face dataset name)")
        suffix = path.suffix.lower()
        kind: SourceKind = "text" if suffix in (".txt", ".raw") else "jsonl" if suffix == ".jsonl" else "parquet"
        return TextSource(arg=arg, location=str(path), kind=kind, text_field=text_field)
    if not path.is_dir() and _looks_like_file(location):
        raise FileNotFoundError(f"`{arg}` file {location!r} does not exist")
    return TextSource(
        arg=arg, location=location, kind="hf", text_field=text_field, dataset_config=dataset_config, split=split
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What the token ids depend on: class, name, vocabulary size and a hash of the full tokenizer definition.

    The definition is the backend tokenizer JSON (vocabulary, merges, added tokens, normalizer, pre-tokenizer...)
    without its ``truncation`` and ``padding`` entries: a call such as ``tokenizer(x, truncation=True)`` leaves
    them set on the backend, and they do not change how a text is tokenized into one stream. A tokenizer without
    a backend is hashed by its vocabulary.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in _TOKENIZER_STATE_KEYS:
            spec.pop(key, None)
        definition = json.dumps(spec, sort_keys=True)
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
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

    The cache key hashes the cache format, the tokenizer (:func:`tokenizer_fingerprint`) and the source
    (:meth:`TextSource.identity`: a file's content hash, or the dataset name/config/split/fingerprint), so editing a
    file or changing the tokenizer re-tokenizes. ``seq_len`` is not part of the key: windows are cut on read.

    Args:
        source: the text to tokenize.
        tokenizer: the tokenizer.
        cache_dir: folder of the cache files.

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
