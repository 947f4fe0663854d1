import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("ddp_sparsity_script.py")


@pytest.mark.parametrize(("criterion", "protocol"), [("wanda", "sequential"), ("sparsegpt", "one_shot")])
def test_ddp_sparsity_two_cpu_ranks_compute_identical_masks(tmp_path, criterion, protocol):
    """strategy="ddp", different calibration batches per rank: same masks, exact sparsity kept through training."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), criterion, protocol], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"{criterion}-rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    # computed independently on each rank (before the DDP re-wrap broadcasts rank 0's state): statistics summed over
    # the ranks give the same masks and, for one-shot SparseGPT (no per-block broadcast), the same updated weights
    assert records[0]["computed"] == records[1]["computed"]
    assert records[0]["masks_after_training"] == records[0]["computed"]["masks"] == records[1]["masks_after_training"]
    assert [r["global_step"] for r in records] == [3, 3]
    assert records[0]["zeros"] == records[1]["zeros"] == round(0.6 * records[0]["total"])
    assert records[0]["checksum"] == records[1]["checksum"]
