import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_depth_script.py")


def test_ddp_depth_pruning_two_cpu_ranks(tmp_path):
    """strategy="ddp" (Lightning relaunches the script for rank 1): same statistics, same blocks, training goes on."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["scores"] == records[1]["scores"]  # reduced across ranks although the batches differed
    assert records[0]["drop_layers"] == records[1]["drop_layers"]
    assert len(records[0]["drop_layers"]) == 2
    assert [r["num_layers"] for r in records] == [4, 4]
    assert [r["global_step"] for r in records] == [3, 3]
    assert records[0]["checksum"] == records[1]["checksum"]  # DDP kept the pruned models in sync while training
