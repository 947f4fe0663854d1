"""Instruction tuning data (Alpaca-style JSON): prompt tokens masked, response and EOS supervised."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from typing_extensions import override

from lit_prune._validation import check_int
from lit_prune.datamodules.base import Batch, TokenDataModule
from lit_prune.datamodules.sources import check_file, read_jsonl
from lit_prune.functional.perplexity import IGNORE_INDEX
from lit_prune.presets import resolve_data_uri

log = logging.getLogger(__name__)

PROMPT_STYLES = ("alpaca", "chat")
_SUFFIXES = (".json", ".jsonl")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def read_records(path: str | Path) -> list[dict[str, str]]:
    """Read Alpaca records from a JSON list or a JSONL file and check each has ``instruction`` and ``output``.

    Errors in a ``.jsonl`` file name the line (counted from 1); in a ``.json`` list, the record index (from 0).

    Args:
        path: the ``.json`` / ``.jsonl`` file.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the suffix is not ``.json``/``.jsonl``, the JSON is malformed, or a record is missing a field.
    """
    resolved = check_file(path, "path", _SUFFIXES)
    describe = f"`path` file {str(path)!r}"
    entries: list[tuple[str, Any]]
    if resolved.suffix.lower() == ".jsonl":
        entries = [(f"line {lineno}", record) for lineno, record in read_jsonl(resolved, describe)]
    else:
        try:
            data: Any = json.loads(resolved.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{describe} is not valid JSON: {err}") from err
        if not isinstance(data, list):
            raise ValueError(f"{describe} must hold a JSON list of records, got {type(data).__name__}")
        entries = [(f"record {i}", record) for i, record in enumerate(data)]
    records = []
    for where, record in entries:
        missing = [key for key in ("instruction", "output") if not isinstance(record, dict) or key not in record]
        if missing:
            raise ValueError(
                f"{describe} {where} has no {missing} field(s); each record needs 'instruction' and 'output' "
                f"('input' is optional)"
            )
        records.append({key: str(record.get(key) or "") for key in ("instruction", "input", "output")})
    return records


class InstructionDataModule(TokenDataModule):
    """Alpaca-style instruction data: ``prompt + response + EOS`` examples with the loss on the response only.

    Records are ``{"instruction", "input", "output"}`` objects in a JSON list (``.json``) or one per line
    (``.jsonl``); ``input`` may be empty or absent. Each example is the prompt tokens, then the ``output`` tokens
    and EOS, truncated from the right to ``seq_len``. ``labels`` are ``-100`` on the prompt and padding, and the
    token ids on the response and EOS. Batches are padded to their longest example:
    ``{"input_ids", "attention_mask", "labels"}``, each a ``(batch, length)`` LongTensor.

    Args:
        path: the ``.json`` / ``.jsonl`` file (``data://alpaca/alpaca_5000.json`` names the shared data folder).
        prompt_style: ``"alpaca"`` (the Stanford Alpaca template, with or without input) or ``"chat"`` (the
            tokenizer's chat template, with one user message ``instruction`` (+ blank line + ``input``) and the
            generation prompt).
        tokenizer: a tokenizer object or a name for :func:`lit_prune.loading.load_tokenizer`; None to use the
            ``.tokenizer`` of the LightningModule being trained.
        gguf_file: GGUF file name inside ``tokenizer`` when that is a folder or hub id.
        seq_len: maximum tokens per example; longer ones are cut from the right, and those whose prompt alone
            fills ``seq_len`` are dropped with a warning.
        val_fraction: fraction of the records held out for validation by a seeded split (0 for none).
        max_samples: use only the first N records of the file; None for all.
        batch_size: examples per batch.
        num_workers: dataloader worker processes.
        seed: seed of the train/val split and of the training shuffle.
        calibration_windows: default number of training examples drawn by :meth:`calibration_dataloader`.
        calibration_seed: default seed of the calibration draw.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for an unknown ``prompt_style``, ``val_fraction`` outside [0, 1), a non-positive size, and, at
            setup, malformed records, no usable example, or ``prompt_style="chat"`` without a chat template.

    Example::

        >>> dm = InstructionDataModule("alpaca.json", tokenizer="builtin:smollm2-135m-instruct")  # doctest: +SKIP
        >>> dm.setup("fit")  # doctest: +SKIP
        >>> sorted(next(iter(dm.train_dataloader())))  # doctest: +SKIP
        ['attention_mask', 'input_ids', 'labels']
    """

    def __init__(
        self,
        path: str,
        prompt_style: Literal["alpaca", "chat"] = "alpaca",
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        gguf_file: str | None = None,
        seq_len: int = 512,
        val_fraction: float = 0.05,
        max_samples: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        calibration_windows: int = 32,
        calibration_seed: int = 0,
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
        if prompt_style not in PROMPT_STYLES:
            raise ValueError(f"`prompt_style` must be one of {list(PROMPT_STYLES)}, got {prompt_style!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}")
        check_int("max_samples", max_samples, allow_none=True)
        path = resolve_data_uri(path, "path")  # data://alpaca/... names the shared data folder
        check_file(path, "path", _SUFFIXES)
        self.path = path
        self.prompt_style = prompt_style
        self.val_fraction = val_fraction
        self.max_samples = max_samples
        # Memos, valid for the tokenizer in `_memo_tokenizer` only (`_reset_memos` clears them when it changes).
        self._train: list[Batch] | None = None
        self._val: list[Batch] = []

    @override
    def _reset_memos(self) -> None:
        self._train = None
        self._val = []

    def prompt(self, instruction: str, input: str = "") -> str:
        """The prompt text of one record in this module's ``prompt_style``.

        Raises:
            ValueError: for ``prompt_style="chat"`` when the tokenizer has no chat template.
        """
        if self.prompt_style == "alpaca":
            template = ALPACA_PROMPT if input else ALPACA_PROMPT_NO_INPUT
            return template.format(instruction=instruction, input=input)
        tokenizer = self.get_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"`prompt_style`='chat' needs a tokenizer with a chat template, and {type(tokenizer).__name__} "
                f"{tokenizer.name_or_path!r} has none: use prompt_style='alpaca'"
            )
        content = f"{instruction}\n\n{input}" if input else instruction
        messages = [{"role": "user", "content": content}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def encode(self, record: dict[str, str]) -> Batch | None:
        """``{"input_ids", "labels"}`` (1-D LongTensors) of one record, or None when the prompt fills ``seq_len``.

        Raises:
            ValueError: if the tokenizer has no EOS token.
        """
        tokenizer = self.get_tokenizer()
        if tokenizer.eos_token_id is None:
            raise ValueError(f"The tokenizer {tokenizer.name_or_path!r} has no EOS token; set `eos_token` on it")
        # The alpaca prompt gets the tokenizer's own BOS (if it adds one); chat templates write theirs in the text.
        add_special = self.prompt_style == "alpaca"
        prompt_ids = tokenizer(self.prompt(record["instruction"], record["input"]), add_special_tokens=add_special)
        response_ids = tokenizer(record["output"], add_special_tokens=False)
        prompt = list(prompt_ids["input_ids"])
        if len(prompt) >= self.seq_len:
            return None
        response = [*response_ids["input_ids"], tokenizer.eos_token_id]
        input_ids = (prompt + response)[: self.seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[: self.seq_len]
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels)}

    @override
    def setup(self, stage: str | None = None) -> None:
        """Read, split (seeded) and tokenize the records once; later calls do nothing until the tokenizer changes.

        Args:
            stage: the Trainer stage; every stage needs the same examples.

        Raises:
            ValueError: for malformed records, when no example is left for training, or without a tokenizer.
        """
        self._current_tokenizer()  # clears the examples if they were encoded with another tokenizer
        if self._train is not None:
            return
        records = read_records(self.path)
        if self.max_samples is not None:
            records = records[: self.max_samples]
        examples = [self.encode(record) for record in records]
        kept = [ex for ex in examples if ex is not None]
        dropped = len(examples) - len(kept)
        if dropped:
            rank_zero_warn(
                f"{dropped} of {len(examples)} examples in {self.path!r} dropped: their prompt alone fills "
                f"`seq_len`={self.seq_len}",
                category=UserWarning,
            )
        if not kept:
            raise ValueError(
                f"`path` file {self.path!r} gives no usable example ({len(records)} records, {dropped} dropped "
                f"because the prompt fills `seq_len`={self.seq_len})"
            )
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = int(len(kept) * self.val_fraction)
        if self.val_fraction > 0 and n_val == 0 and len(kept) > 1:
            n_val = 1
        self._val = [kept[i] for i in order[:n_val]]
        self._train = [kept[i] for i in order[n_val:]]
        log.info(
            "%s: %d records -> %d train / %d val examples (%d dropped), seq_len %d, prompt_style %s",
            Path(self.path).name,
            len(records),
            len(self._train),
            len(self._val),
            dropped,
            self.seq_len,
            self.prompt_style,
        )

    def _train_examples(self) -> list[Batch]:
        self.setup()  # a no-op once set up, unless the tokenizer changed
        assert self._train is not None  # set by setup
        return self._train

    @override
    def collate(self, examples: list[Batch]) -> Batch:
        """Right-pad to the longest example: ``pad_token_id`` in ``input_ids``, 0 in the mask, -100 in ``labels``."""
        tokenizer = self.get_tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = max(ex["input_ids"].numel() for ex in examples)
        input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
        for row, ex in enumerate(examples):
            n = ex["input_ids"].numel()
            input_ids[row, :n] = ex["input_ids"]
            labels[row, :n] = ex["labels"]
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self._train_examples(), self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        self._train_examples()
        return self._eval_loader_over(self._val, "validation") if self._val else []

    @override
    def test_dataloader(self) -> DataLoader | list[DataLoader]:
        return []  # no test split: Lightning skips the loop

    @override
    def _calibration_dataset(self) -> list[Batch]:
        return self._train_examples()
