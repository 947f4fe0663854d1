import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_width_script.py")


@pytest.mark.parametrize("reconstruct", ["none", "lsq"])
def test_ddp_width_pruning_two_cpu_ranks(tmp_path, reconstruct):
    """strategy="ddp" (Lightning relaunches the script for rank 1): same scores, same cuts, training goes on; with
    ``reconstruct="lsq"`` the Grams are reduced too, so both ranks refit to the same weights before DDP re-wraps."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), reconstruct], capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["scores"] == records[1]["scores"]  # reduced across ranks although the batches differed
    assert records[0]["plan"] == records[1]["plan"] and records[0]["plan"]["keep_neurons"]
    assert records[0]["shapes"] == records[1]["shapes"]
    assert [r["global_step"] for r in records] == [3, 3]
    assert records[0]["checksum"] == records[1]["checksum"]  # DDP kept the pruned models in sync while training
    assert records[0]["own_checksum"] == records[1]["own_checksum"]  # each rank's own surgery, before the re-wrap
    assert records[0]["reconstruction"] == records[1]["reconstruction"]
    assert (records[0]["reconstruction"] is None) == (reconstruct == "none")
    if reconstruct == "lsq":
        assert records[0]["reconstruction"]["lambdas"]
