"""Run by test_ddp_mop: MixtureOfPruners under `strategy="ddp"` on 2 CPU ranks (Lightning relaunches this file).

Each rank holds different held-out windows; proxies and statistics are reduced across ranks, so both ranks must
take the same path and end with the same architecture, and training must go on in sync.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.callbacks import MixtureOfPruners
from lit_prune.surgery import block_shapes


class RankCalibration(MixtureOfPruners):
    """Give every rank its own held-out windows (as a real sharded calibration set would)."""

    def calibration_loader(self, datamodule):  # type: ignore[override]
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        g = torch.Generator().manual_seed(100 + rank)
        return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (4, 16), generator=g)], batch_size=2)


class Record(pl.Callback):
    def __init__(self, out: Path, mop: MixtureOfPruners) -> None:
        self.out, self.mop = out, mop

    def on_train_end(self, trainer, pl_module):
        record = {
            "world_size": trainer.world_size,
            "path": self.mop.path,
            "proxies": [[s["proxy_depth"], s["proxy_width"]] for s in self.mop.trajectory],
            "shapes": [list(vars(s).values()) for s in block_shapes(pl_module.model)],
            "num_layers": len(pl_module.model.model.layers),
            "global_step": trainer.global_step,
            "checksum": float(sum(p.detach().double().sum() for p in pl_module.parameters())),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def main() -> None:
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=24)
    module = CausalLMModule(model=LlamaForCausalLM(cfg))
    mop = RankCalibration(target=0.3, proxy="ppl", verbose=0, save_model=False)
    g = torch.Generator().manual_seed(7)
    train = DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (16, 16), generator=g)], batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out, callbacks=[mop, Record(out, mop)])
    trainer.fit(module, train_dataloaders=train)


if __name__ == "__main__":
    main()
