from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

from lit_prune.datamodules import InstructionDataModule
from lit_prune.datamodules.instruction import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from lit_prune.functional.perplexity import IGNORE_INDEX

RECORDS = [
    {"instruction": "Name the fox.", "input": "", "output": "The quick brown fox."},
    {"instruction": "Explain pruning.", "input": "Pruning removes heads", "output": "It removes blocks and neurons."},
    {"instruction": "Say perplexity.", "output": "Perplexity is the exponential of the mean negative log likelihood."},
    {"instruction": "What do callbacks do?", "input": "Lightning", "output": "Callbacks decide when to prune."},
]


@pytest.fixture
def alpaca_file(tmp_path: Path) -> Path:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    return path


def reference(tokenizer, record: dict[str, str]) -> tuple[list[int], list[int]]:
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = tokenizer(template.format(instruction=record["instruction"], input=record.get("input", "")))["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, response


def test_prompt_masked_response_and_eos_supervised(alpaca_file, tiny_tokenizer):
    dm = InstructionDataModule(str(alpaca_file), tokenizer=tiny_tokenizer, val_fraction=0.0, seq_len=512)
    dm.setup("fit")
    examples = [dm.encode(r | {"input": r.get("input", "")}) for r in RECORDS]
    for record, example in zip(RECORDS, examples):
        prompt, response = reference(tiny_tokenizer, record)
        assert example["input_ids"].tolist() == prompt + response
        assert example["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + response
        assert example["labels"][-1] == tiny_tokenizer.eos_token_id
    assert len(dm._train) == len(RECORDS)
    assert dm.val_dataloader() == []
    assert dm.test_dataloader() == []


def test_collate_pads_to_longest_and_masks_padding(alpaca_file, tiny_tokenizer):
    dm = InstructionDataModule(str(alpaca_file), tokenizer=tiny_tokenizer, val_fraction=0.0, batch_size=4)
    batch = next(iter(dm.train_dataloader()))  # sets itself up lazily
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape == (4, int(lengths.max()))
    assert len(set(lengths.tolist())) > 1  # the records differ in length, so some rows are padded
    for row, n in enumerate(lengths.tolist()):
        assert (batch["input_ids"][row, n:] == tiny_tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][row, :n] == 1).all()
        assert batch["labels"][row, n - 1] == tiny_tokenizer.eos_token_id


def test_truncation_and_dropped_examples(alpaca_file, tiny_tokenizer):
    prompt, response = reference(tiny_tokenizer, RECORDS[0])
    seq_len = len(prompt) + 2
    dm = InstructionDataModule(str(alpaca_file), tokenizer=tiny_tokenizer, seq_len=seq_len, val_fraction=0.0)
    example = dm.encode(RECORDS[0])
    assert example["input_ids"].tolist() == (prompt + response)[:seq_len]
    assert example["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + response[:2]
    longest_prompt = max(len(reference(tiny_tokenizer, r)[0]) for r in RECORDS)
    assert longest_prompt > seq_len  # at least one record is dropped
    with pytest.warns(
        UserWarning, match=rf"\d of 4 examples in .* dropped: their prompt alone fills `seq_len`={seq_len}"
    ):
        dm.setup("fit")
    assert 0 < len(dm._train) < 4
    assert all(ex["input_ids"].numel() <= seq_len for ex in dm._train)


def test_seeded_split_jsonl_and_max_samples(tmp_path, tiny_tokenizer):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS * 3) + "\n")

    def split(seed: int) -> tuple[list[list[int]], list[list[int]]]:
        dm = InstructionDataModule(str(path), tokenizer=tiny_tokenizer, val_fraction=0.25, seed=seed, max_samples=8)
        dm.setup()
        return [e["input_ids"].tolist() for e in dm._train], [e["input_ids"].tolist() for e in dm._val]

    train, val = split(0)
    assert (len(train), len(val)) == (6, 2)
    assert split(0) == (train, val)
    assert split(1) != (train, val)


def test_calibration_from_training_split(alpaca_file, tiny_tokenizer):
    dm = InstructionDataModule(str(alpaca_file), tokenizer=tiny_tokenizer, val_fraction=0.25, calibration_windows=2)
    batches = list(dm.calibration_dataloader(batch_size=2))
    assert len(batches) == 1 and batches[0]["input_ids"].shape[0] == 2
    train = {tuple(e["input_ids"].tolist()) for e in dm._train}
    for row, n in zip(batches[0]["input_ids"], batches[0]["attention_mask"].sum(1)):
        assert tuple(row[:n].tolist()) in train
    again = list(dm.calibration_dataloader(batch_size=2))
    assert torch.equal(batches[0]["input_ids"], again[0]["input_ids"])
    with pytest.raises(ValueError, match=r"`n`=4 calibration examples requested, but .* only 3"):
        dm.calibration_dataloader(n=4)


def test_changing_the_tokenizer_encodes_again(alpaca_file, tiny_tokenizer):
    dm = InstructionDataModule(str(alpaca_file), tokenizer=tiny_tokenizer, val_fraction=0.0)
    first = [e["input_ids"].tolist() for e in dm.calibration_dataloader(n=4, batch_size=1)]
    other = copy.deepcopy(tiny_tokenizer)
    other.add_tokens(["quick brown"])
    dm.tokenizer = other
    dm.setup("fit")
    again = [e["input_ids"].tolist() for e in dm.calibration_dataloader(n=4, batch_size=1)]
    assert again != first
    prompt, response = reference(other, RECORDS[0])
    assert prompt + response in [row[0] for row in again]


def test_val_loader_scores_each_example_once_across_ranks(tmp_path, tiny_tokenizer):
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS * 3) + "\n")
    dm = InstructionDataModule(str(path), tokenizer=tiny_tokenizer, val_fraction=0.25, batch_size=1)
    dm.setup("fit")
    assert len(dm._val) == 3
    counts = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.val_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        counts.append(len(list(loader)))
    assert counts == [2, 1]


def test_jsonl_errors_name_the_line(tmp_path, tiny_tokenizer):
    cases = {
        "bad.jsonl": ('{"instruction": "x", "output": "y"}\n{not json\n', r"'.*bad.jsonl' line 2 is not valid JSON"),
        "missing.jsonl": (
            f"{json.dumps(RECORDS[0])}\n\n{json.dumps({'instruction': 'x'})}\n",
            r"'.*missing.jsonl' line 3 has no \['output'\] field",
        ),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match=match):
            InstructionDataModule(str(path), tokenizer=tiny_tokenizer).setup("fit")


def test_chat_prompt_style(alpaca_file, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %} assistant:{% endif %}"
    )
    dm = InstructionDataModule(str(alpaca_file), prompt_style="chat", tokenizer=tok, val_fraction=0.0)
    assert dm.prompt("Explain pruning.", "heads") == "<s>user: Explain pruning.\n\nheads assistant:"
    example = dm.encode({"instruction": "Name the fox.", "input": "", "output": "The quick brown fox."})
    prompt = tok("<s>user: Name the fox. assistant:", add_special_tokens=False)["input_ids"]
    response = tok("The quick brown fox.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert example["input_ids"].tolist() == prompt + response
    assert example["labels"].tolist() == [IGNORE_INDEX] * len(prompt) + response


def test_instruction_datamodule_misconfiguration(tmp_path, alpaca_file, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match=r"`path` file 'nope/alpaca.json' does not exist"):
        InstructionDataModule("nope/alpaca.json", tokenizer=tiny_tokenizer)
    txt = tmp_path / "alpaca.txt"
    txt.write_text("[]")
    with pytest.raises(
        ValueError, match=r"`path` file '.*alpaca.txt' has unsupported suffix '.txt'; supported: \['.json', '.jsonl'\]"
    ):
        InstructionDataModule(str(txt), tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match=r"`prompt_style` must be one of \['alpaca', 'chat'\], got 'vicuna'"):
        InstructionDataModule(str(alpaca_file), prompt_style="vicuna")
    with pytest.raises(ValueError, match=r"`val_fraction` must be in \[0, 1\), got 1.0"):
        InstructionDataModule(str(alpaca_file), val_fraction=1.0)
    with pytest.raises(ValueError, match=r"`max_samples` must be an int >= 1 or None, got 0"):
        InstructionDataModule(str(alpaca_file), max_samples=0)

    cases = {
        "broken.json": ("[{", r"`path` file '.*broken.json' is not valid JSON"),
        "dict.json": ('{"instruction": "x"}', r"must hold a JSON list of records, got dict"),
        "missing.json": (
            json.dumps([RECORDS[0], {"instruction": "x"}]),
            r"'.*missing.json' record 1 has no \['output'\]",
        ),
        "empty.json": ("[]", r"`path` file '.*empty.json' gives no usable example \(0 records"),
    }
    for name, (content, match) in cases.items():
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(ValueError, match=match):
            InstructionDataModule(str(path), tokenizer=tiny_tokenizer).setup("fit")
    with (
        pytest.raises(ValueError, match=r"gives no usable example \(4 records, 4 dropped"),
        pytest.warns(UserWarning, match="dropped"),
    ):
        InstructionDataModule(str(alpaca_file), tokenizer=tiny_tokenizer, seq_len=2).setup("fit")
    with pytest.raises(ValueError, match=r"needs a tokenizer with a chat template.*use prompt_style='alpaca'"):
        InstructionDataModule(str(alpaca_file), prompt_style="chat", tokenizer=tiny_tokenizer).setup("fit")
    no_eos = copy.deepcopy(tiny_tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match=r"has no EOS token; set `eos_token`"):
        InstructionDataModule(str(alpaca_file), tokenizer=no_eos).setup("fit")


def test_data_uri_names_the_shared_data_folder(tmp_path, monkeypatch, tiny_tokenizer):
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "a.json").write_text(json.dumps(RECORDS))
    monkeypatch.setenv("LIT_PRUNE_DATA_DIR", str(tmp_path))
    dm = InstructionDataModule("data://alpaca/a.json", tokenizer=tiny_tokenizer, val_fraction=0.0)
    assert dm.path == str(tmp_path / "alpaca" / "a.json")
    dm.setup("fit")
    assert len(dm._train) == len(RECORDS)
    with pytest.raises(FileNotFoundError, match="alpaca/missing.json. does not exist"):
        InstructionDataModule("data://alpaca/missing.json", tokenizer=tiny_tokenizer)
