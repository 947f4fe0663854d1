import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_mop_script.py")


def test_ddp_mop_two_cpu_ranks(tmp_path):
    """strategy="ddp" on 2 CPU ranks with different held-out windows: same proxies, same path, same architecture."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert records[0]["proxies"] == records[1]["proxies"]  # reduced across ranks although the windows differed
    assert records[0]["path"] == records[1]["path"] and len(records[0]["path"]) >= 2
    assert records[0]["shapes"] == records[1]["shapes"] and records[0]["num_layers"] == records[1]["num_layers"]
    assert [r["global_step"] for r in records] == [3, 3]
    assert records[0]["checksum"] == records[1]["checksum"]
