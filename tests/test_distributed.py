"""DDP on CPU (gloo, 2 ranks): validation perplexity is summed across ranks, not averaged per rank."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import tiny_config
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.eval import perplexity


class _Windows(pl.LightningDataModule):
    def __init__(self, windows: torch.Tensor) -> None:
        super().__init__()
        self.data = windows

    def val_dataloader(self) -> DataLoader:
        return DataLoader([{"input_ids": w} for w in self.data], batch_size=2)


def test_ddp_validate_equals_single_process_perplexity(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    # DistributedSampler gives rank r the windows r, r+2, ...: rank 0 scores random text, rank 1 a repeated token,
    # so their losses differ a lot and averaging per-rank perplexities would give a different number.
    g = torch.Generator().manual_seed(1)
    windows = torch.empty(8, 16, dtype=torch.long)
    windows[0::2] = torch.randint(4, 256, (4, 16), generator=g)
    windows[1::2] = 7
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(10):  # make the repeated token easy to predict
        opt.zero_grad()
        model(input_ids=windows[1::2], labels=windows[1::2]).loss.backward()
        opt.step()
    expected = perplexity(model, windows, progress=False)
    per_rank = [perplexity(model, windows[r::2], progress=False) for r in (0, 1)]
    assert abs(sum(per_rank) / 2 - expected) > 0.05 * expected  # the test can tell the two apart
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    (metrics,) = trainer.validate(CausalLMModule(model=model), datamodule=_Windows(windows), verbose=False)
    assert metrics["val_ppl"] == pytest.approx(expected, rel=1e-5)
