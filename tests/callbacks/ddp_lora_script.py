"""Run by test_ddp_lora: DepthPruning then CKALoRA under `strategy="ddp"` on 2 CPU ranks (Lightning relaunches it).

Every rank trains (and so scores the blocks) on its own data. Both ranks must attach adapters to the blocks rank 0
selected on the pruned model, and DDP must keep the adapters identical.
"""

import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.callbacks import CKALoRA, DepthPruning

RANK = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning in the relaunched process (rank 1)


class Record(pl.Callback):
    def __init__(self, out: Path, depth: DepthPruning, lora: CKALoRA) -> None:
        self.out, self.depth, self.lora = out, depth, lora
        self.first_batch: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.first_batch:
            self.first_batch = batch["input_ids"].flatten().tolist()

    def on_train_end(self, trainer, pl_module):
        lora = {n: p.detach().clone() for n, p in pl_module.named_parameters() if "lora_" in n}
        torch.save(lora, self.out / f"lora{trainer.global_rank}.pt")
        record = {
            "rank": trainer.global_rank,
            "env_rank": RANK,
            "world_size": trainer.world_size,
            "drop_layers": self.depth.plans[0]["drop_layers"],
            "num_layers": len(pl_module.model.get_base_model().model.layers),
            "attachments": self.lora.attachments,
            "importance": self.lora.last_importance.tolist(),
            "global_step": trainer.global_step,
            "first_batch": self.first_batch,
            "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
    )
    module = CausalLMModule(model=LlamaForCausalLM(cfg), lr=1e-2)
    g = torch.Generator().manual_seed(100)
    calibration = DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (4, 16), generator=g)], batch_size=2)
    depth = DepthPruning(criterion="bi", num_layers=2, calibration=calibration, verbose=0)
    lora = CKALoRA(ratio=0.5, r=2, n_samples=8, merge_at_end=False, verbose=0)
    g = torch.Generator().manual_seed(7 + RANK)  # each rank its own training data, so its own CKA samples
    train = DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (16, 16), generator=g)], batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[depth, lora, Record(out, depth, lora)],
    )
    trainer.fit(module, train_dataloaders=train)


if __name__ == "__main__":
    main()
