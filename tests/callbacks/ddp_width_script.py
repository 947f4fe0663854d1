"""Run by test_ddp_width_pruning: WidthPruning under `strategy="ddp"` on 2 CPU ranks (Lightning relaunches this file).

Each rank calibrates on different batches; the AMP statistics must reduce to the same scores, both ranks must cut
the same heads and neurons, and training must continue after surgery with parameters kept in sync.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.callbacks import WidthPruning
from lit_prune.surgery import block_shapes


class RankCalibration(WidthPruning):
    """Give every rank its own calibration batches (as a real sharded calibration set would)."""

    def calibration_loader(self, datamodule):  # type: ignore[override]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed(100 + rank)
        return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (4, 16), generator=g)], batch_size=2)

    def prune(self, pl_module, calibration):  # type: ignore[override]
        plan = super().prune(pl_module, calibration)
        # before DDP's re-wrap broadcasts rank 0's parameters: what this rank's own surgery (and refit) produced
        self.own_checksum = float(sum(p.detach().double().sum() for p in pl_module.parameters()))
        return plan


class Record(pl.Callback):
    def __init__(self, out: Path, width: WidthPruning) -> None:
        self.out, self.width = out, width

    def on_train_end(self, trainer, pl_module):
        scores = self.width.last_scores
        record = {
            "world_size": trainer.world_size,
            "plan": {k: self.width.plans[0][k] for k in ("keep_heads", "keep_neurons", "params_after")},
            "scores": [t.tolist() for t in (*scores.heads, *scores.neurons)],
            "shapes": [list(vars(s).values()) for s in block_shapes(pl_module.model)],
            "global_step": trainer.global_step,
            "reconstruction": self.width.plans[0]["reconstruction"],
            "own_checksum": self.width.own_checksum,
            "checksum": float(sum(p.detach().double().sum() for p in pl_module.parameters())),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    module = CausalLMModule(model=LlamaForCausalLM(cfg))
    reconstruct = sys.argv[2] if len(sys.argv) > 2 else "none"
    width = RankCalibration(criterion="amp", amount=0.25, allocation="global", reconstruct=reconstruct, verbose=0)
    g = torch.Generator().manual_seed(7)
    train = DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (16, 16), generator=g)], batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out, callbacks=[width, Record(out, width)])
    trainer.fit(module, train_dataloaders=train)


if __name__ == "__main__":
    main()
