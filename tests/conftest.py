"""Shared fixtures: tiny random LLaMA-family models (GQA, head_dim != hidden/heads) and a tiny tokenizer."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing as mp
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 256
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes blocks, heads and neurons from a language model.",
    "Lightning runs the training loop; callbacks decide when to prune.",
    "Perplexity is the exponential of the mean negative log likelihood.",
    "Attention heads share key and value projections under grouped query attention.",
] * 4


def tiny_config(**overrides: object) -> LlamaConfig:
    """hidden 64, 4 layers, 4 query heads, 2 KV heads, head_dim 24 (not 64/4): catches head_dim assumptions."""
    fields: dict[str, object] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def spawn_ranks(worker: Callable[..., None], out: str, world: int = 2) -> None:
    """Run ``worker(rank, world, port, out)`` on ``world`` CPU processes (gloo) on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, out), nprocs=world, join=True)


def identity_model(layers: int = 6, identity: tuple[int, ...] = (2, 4)) -> LlamaForCausalLM:
    """A tiny model whose blocks ``identity`` are exact identities (o_proj and down_proj zero)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=layers)).eval()
    for i in identity:
        torch.nn.init.zeros_(model.model.layers[i].self_attn.o_proj.weight)
        torch.nn.init.zeros_(model.model.layers[i].mlp.down_proj.weight)
    return model


def padded_batches(count: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``count`` unpadded batches of 3 rows, then one with right padding (row 0), left padding (row 1), a full row."""
    g = torch.Generator().manual_seed(seed)
    batches = [{"input_ids": torch.randint(4, 256, (3, 10), generator=g)} for _ in range(count)]
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0
    mask[1, :4] = 0
    batches.append({"input_ids": torch.randint(4, 256, (3, 12), generator=g), "attention_mask": mask})
    return batches


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture
def tiny_model_dir(tmp_path: Path, tiny_model: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A saved tiny model plus tokenizer, loadable with ``from_pretrained``."""
    out = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    """A small plain-text corpus (~2k tokens with the tiny tokenizer)."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * 10) + "\n")
    return path


def quiet_trainer(root: Path | str, callbacks: list, max_steps: int = 3, **overrides: object) -> pl.Trainer:
    """A single-process CPU Trainer for callback tests: no logger, checkpoints, progress bar or model summary."""
    args: dict[str, object] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        max_steps=max_steps,
    )
    args.update(overrides)
    return pl.Trainer(callbacks=callbacks, **args)


def tiny_cli_config(
    tmp_path: Path,
    model_dir: Path | str,
    text_file: Path | str,
    *,
    data: dict | None = None,
    trainer: dict | None = None,
    name: str = "tiny.yaml",
) -> Path:
    """A CLI config file for the tiny model: TextDataModule over ``text_file`` (16-token windows, batches of 3) and a
    quiet single-process CPU Trainer; ``data`` / ``trainer`` add to or override their ``init_args`` / keys."""
    import yaml

    cfg = {
        "seed_everything": 0,
        "model": {"model": str(model_dir)},
        "data": {
            "class_path": "lit_prune.datamodules.TextDataModule",
            "init_args": {"path": str(text_file), "val_path": str(text_file), "seq_len": 16, "batch_size": 3,
                          "cache_dir": str(tmp_path / "cache"), **(data or {})},
        },
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "default_root_dir": str(tmp_path / "run"), **(trainer or {})},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path
