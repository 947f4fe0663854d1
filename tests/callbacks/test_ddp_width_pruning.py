import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_width_script.py")


def test_ddp_width_pruning_two_cpu_ranks(tmp_path):
    """strategy="ddp" (Lightning relaunches the script for rank 1): same scores, same cuts, training goes on."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["scores"] == records[1]["scores"]  # reduced across ranks although the batches differed
    assert records[0]["plan"] == records[1]["plan"] and records[0]["plan"]["keep_neurons"]
    assert records[0]["shapes"] == records[1]["shapes"]
    assert [r["global_step"] for r in records] == [3, 3]
    assert records[0]["checksum"] == records[1]["checksum"]  # DDP kept the pruned models in sync while training
