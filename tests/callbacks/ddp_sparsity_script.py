"""Run by test_ddp_sparsity: SparsityPruning under `strategy="ddp"` on 2 CPU ranks (Lightning relaunches this file).

Each rank calibrates on different batches; the statistics are summed over the ranks, so both ranks must compute the
same masks (and, for SparseGPT, the same updated weights), and training must keep the zeros and the ranks in sync.
Arguments: output folder, criterion, protocol (the sequential protocol also broadcasts each pruned block from rank 0,
so only the masks, computed before that broadcast, show that the ranks agree by themselves there).
"""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.callbacks import SparsityPruning
from lit_prune.sparse import masks_of, sparsity_report


def _digest(tensors) -> str:
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()


class RankCalibration(SparsityPruning):
    """Give every rank its own calibration batches (as a real sharded calibration set would), and fingerprint what
    each rank computed before the DDP wrapper is rebuilt (which would broadcast rank 0's weights and buffers)."""

    def calibration_loader(self, datamodule):  # type: ignore[override]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed(100 + rank)
        return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (4, 16), generator=g)], batch_size=2)

    def prune(self, pl_module, calibration):  # type: ignore[override]
        plan = super().prune(pl_module, calibration)
        self.computed = {
            "masks": _digest(self.last_result.masks.values()),
            "weights": _digest(p for p in pl_module.parameters()),
        }
        return plan


class Record(pl.Callback):
    def __init__(self, out: Path, name: str, sparsity: RankCalibration) -> None:
        self.out, self.name, self.sparsity = out, name, sparsity

    def on_train_end(self, trainer, pl_module):
        report = sparsity_report(pl_module)
        record = {
            "world_size": trainer.world_size,
            "computed": self.sparsity.computed,
            "masks_after_training": _digest(masks_of(pl_module).values()),
            "zeros": report.zeros,
            "total": report.total,
            "global_step": trainer.global_step,
            "checksum": float(sum(p.detach().double().sum() for p in pl_module.parameters())),
        }
        (self.out / f"{self.name}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out, criterion, protocol = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    module = CausalLMModule(model=LlamaForCausalLM(cfg), lr=1e-2)
    sparsity = RankCalibration(criterion=criterion, sparsity=0.6, allocation="owl", lam=0.05, protocol=protocol,
                               verbose=0)
    g = torch.Generator().manual_seed(7)
    train = DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (16, 16), generator=g)], batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out, callbacks=[sparsity, Record(out, criterion, sparsity)])
    trainer.fit(module, train_dataloaders=train)


if __name__ == "__main__":
    main()
