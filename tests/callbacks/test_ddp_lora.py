import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).with_name("ddp_lora_script.py")


def test_ddp_cka_lora_after_depth_pruning_two_cpu_ranks(tmp_path):
    """strategy="ddp": ranks see different data, score CKA on all of it, select the same blocks, identical adapters."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["env_rank"] for r in records] == [0, 1]  # the script built rank-specific training data
    assert records[0]["first_batch"] != records[1]["first_batch"]  # the ranks trained on different data
    assert records[0]["drop_layers"] == records[1]["drop_layers"] and len(records[0]["drop_layers"]) == 2
    assert [r["num_layers"] for r in records] == [4, 4]
    assert records[0]["importance"] == records[1]["importance"]  # scored on both ranks' samples, reduced ...
    assert len(records[0]["importance"]) == 4  # (on the pruned model)
    layers = [r["attachments"][-1]["layers"] for r in records]
    rank0 = sorted(sorted(range(4), key=lambda i: -records[0]["importance"][i])[:2])
    assert layers[0] == layers[1] == rank0  # ... and every rank attached the same selection
    assert [len(r["attachments"]) for r in records] == [1, 1]
    assert [r["global_step"] for r in records] == [3, 3]
    assert records[0]["trainable"] == records[1]["trainable"]
    assert all("lora_" in n for n in records[0]["trainable"])
    adapters = [torch.load(tmp_path / f"lora{r}.pt") for r in (0, 1)]
    assert sorted(adapters[0]) == sorted(adapters[1]) == records[0]["trainable"]
    assert {int(n.split("layers.")[1].split(".")[0]) for n in adapters[0]} == set(layers[0])
    for name, value in adapters[0].items():
        assert torch.equal(value, adapters[1][name]), name  # DDP kept the adapters in sync
    assert all(v.abs().sum() > 0 for n, v in adapters[0].items() if "lora_B" in n)  # and they were trained
