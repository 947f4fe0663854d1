"""``lit-prune demo``: MoP to 25% of all parameters on SmolLM2-135M-Instruct, dense vs pruned, one table.

Everything follows the CPU protocol (:data:`lit_prune.presets.CPU_PROTOCOL`): perplexity on the first 32 windows of
256 tokens of WikiText-2 test, latency on 128-token prompts. MoP runs in one shot with the ``ppl`` proxy on 8
held-out windows of WikiText-2 validation; the pruned model is saved (a stock checkpoint) to ``--output``.
Latency is measured after pruning, on the pruned model and a copy of the dense one kept for it, timed alternately
(:func:`lit_prune.eval.latency.compare_latency`, ``--rounds`` rounds) so load on the machine hits both alike; the
speed-ups are reported with their range over the rounds.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

from lit_prune.callbacks.mop import MixtureOfPruners
from lit_prune.datamodules import TextDataModule
from lit_prune.eval.latency import LatencyComparison, compare_latency
from lit_prune.eval.summary import evaluate_model, format_table
from lit_prune.io import save_pretrained
from lit_prune.module import CausalLMModule
from lit_prune.presets import CPU_PROTOCOL

log = logging.getLogger(__name__)


def demo_parser() -> argparse.ArgumentParser:
    """Options of ``lit-prune demo``."""
    parser = argparse.ArgumentParser(prog="lit-prune demo", description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--target", type=float, default=0.25, help="fraction of all parameters to remove")
    parser.add_argument("--proxy", default="ppl", choices=["ppl", "kl", "cosine", "random"])
    parser.add_argument("--holdout", type=int, default=8, help="held-out windows for MoP's proxy and statistics")
    parser.add_argument("--output", default="runs/demo/mop-25", help="where the pruned model is saved")
    parser.add_argument("--rounds", type=int, default=5, help="alternation rounds of the dense-vs-pruned timing")
    return parser


def run_demo(args: list[str]) -> str:
    """Run the demo; returns the dense-vs-pruned table (the CLI prints it).

    Raises:
        SystemExit: if the shared WikiText-2 files are missing (the demo needs them for calibration and PPL).
    """
    parser = demo_parser()
    opts = parser.parse_args(args)
    if opts.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {opts.rounds}")
    proto = CPU_PROTOCOL
    eval_path, calib_path = proto.eval_path(), proto.calibration_path()
    if eval_path is None or calib_path is None or not eval_path.is_file() or not calib_path.is_file():
        raise SystemExit(
            "lit-prune demo needs WikiText-2 (../shared/data/wikitext2 next to the checkout, or $LIT_PRUNE_DATA_DIR); "
            f"not found (looked for {eval_path} and {calib_path})"
        )
    start = time.perf_counter()
    module = CausalLMModule(model=proto.model)
    data = TextDataModule(
        tokenizer=module.tokenizer,
        val_path=str(eval_path),
        calibration_path=str(calib_path),
        seq_len=proto.seq_len,
        max_val_windows=proto.eval_windows,
        batch_size=4,
    )
    windows = data.windows("val")
    source = f"{eval_path.name} (first {proto.eval_windows} windows of {proto.seq_len} tokens)"
    dense = evaluate_model(module.model, "dense", windows, source)
    dense_copy = copy.deepcopy(module.model)  # timed next to the pruned model after pruning (540 MB in float32)
    mop = MixtureOfPruners(target=opts.target, proxy=opts.proxy, verbose=1)
    mop_start = time.perf_counter()
    plans = mop.prune_all(module, data.calibration_dataloader(n=opts.holdout, seed=1))
    mop_seconds = time.perf_counter() - mop_start
    pruned = evaluate_model(module.model, f"MoP {opts.target:.0%}", windows, source)
    log.info("Timing dense and pruned alternately (%d rounds)", opts.rounds)
    timing = compare_latency(module.model, dense_copy, rounds=opts.rounds, **proto.latency_kwargs())
    del dense_copy
    dense.latency, pruned.latency = timing.median_reference(), timing.median_model()
    folder = save_pretrained(module.model, Path(opts.output), tokenizer=module.tokenizer, plans=plans)
    table = "\n".join(
        [
            format_table([dense, pruned]),
            *speed_lines(timing),
            "",
            f"MoP path ({len(mop.trajectory)} steps; L = a block removed, G = heads + neurons): {mop.path}",
            f"MoP took {mop_seconds:.0f} s (proxy {opts.proxy} on {opts.holdout} held-out windows of wiki.valid.raw); "
            f"the pruned model is in {folder} (plain AutoModelForCausalLM.from_pretrained); whole demo "
            f"{time.perf_counter() - start:.0f} s.",
        ]
    )
    return table


def speed_lines(timing: LatencyComparison) -> list[str]:
    """The pruned-vs-dense ratios with their spread, e.g. ``prefill, batch 1: 0.74x dense time (range ...)``."""
    lines = [
        f"Pruned vs dense, timed alternately ({timing.rounds} rounds; the table shows the medians over the rounds):"
    ]
    lines += [f"  prefill, batch {b}: {timing.prefill_ratio(b)} of dense time" for b in timing.model[0].prefill_ms]
    lines.append(f"  decode, batch 1: {timing.decode_ratio()} dense throughput")
    return lines
