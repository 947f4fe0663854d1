"""Every pruning method's output on a tiny seeded model, pinned to what lit-prune produced before the issue-15 refactor.

``tests/data/spine_pins.json`` was generated from commit 7d15382 by ``benchmarks/spine.py --tiny`` (the same
fingerprints the SmolLM2 benchmark records in ``benchmarks/spine_baseline.json``): the removed blocks of every depth
criterion, the kept heads and neurons of every width criterion in both GQA modes and both allocations, MoP paths at a
25% target (every proxy, depth only, position only, GQA group), and the Wanda / SparseGPT / magnitude masks (uniform,
OWL, OWL + TRIM, one-shot, 2:4). Each item is a test of its own, so a failure names the method that changed and
prints what moved (kept counts per block or Linear, which blocks' masks changed) and how close the call was.

The items were reproduced bit for bit under OMP_NUM_THREADS=1, ATEN_CPU_CAPABILITY=default / avx2 / (native)
avx512, except ``sparse/wanda/2:4``, pinned by a property (exact kept counts, at most 0.2% of mask bits changed):
see ``TINY_TOLERANT`` in ``benchmarks/spine.py``.

Regenerate only for an intended change of behaviour: ``.venv/bin/python tests/test_spine_pins.py``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PINS_FILE = Path(__file__).resolve().parent / "data" / "spine_pins.json"


def _load_spine() -> Any:
    name = "lit_prune_benchmarks_spine"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "spine.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


PINS: dict[str, Any] = json.loads(PINS_FILE.read_text())


@pytest.fixture(scope="module")
def spine() -> Any:
    return _load_spine()


@pytest.fixture(scope="module")
def fresh(spine: Any) -> Iterator[dict[str, Any]]:
    # one thread: the same pins (checked) and no OpenMP spinning on a busy machine (4 s instead of 2 minutes there)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield spine.tiny_fingerprints()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(PINS["items"]))
def test_pinned_output_is_unchanged(name: str, spine: Any, fresh: dict[str, Any]) -> None:
    saved, now = PINS["items"][name], fresh["items"].get(name)
    if spine.matches(saved, now):
        return
    lines = [f"{name} changed: {spine.describe_difference(saved, now)}"]
    for label, source in (("pinned", PINS), ("now", fresh)):
        if name in source["info"]:
            lines.append(f"{label} info: {json.dumps(source['info'][name])[:400]}")
    pytest.fail("\n".join(lines))


def test_every_method_run_is_pinned(fresh: dict[str, Any]) -> None:
    assert sorted(fresh["items"]) == sorted(PINS["items"])


def test_the_pins_cover_every_method() -> None:
    names = list(PINS["items"])
    for prefix, count in (("depth/", 12), ("width/", 52), ("mop/", 7), ("sparse/", 10)):
        assert sum(n.startswith(prefix) for n in names) == count, prefix
    paths = {PINS["items"][n]["path"] for n in names if n.startswith("mop/")}
    assert any("L" in p for p in paths) and any("G" in p for p in paths)  # both branches are exercised


if __name__ == "__main__":
    _load_spine().main(["--tiny", "--out", str(PINS_FILE)])
