"""``lit-prune demo``: MoP to 25% of all parameters on SmolLM2-135M-Instruct, dense vs pruned, one table.

Everything follows the CPU protocol (:data:`lit_prune.presets.CPU_PROTOCOL`): perplexity on the first 32 windows of
256 tokens of WikiText-2 test, latency on 128-token prompts. MoP runs in one shot with the ``ppl`` proxy on 8
held-out windows of WikiText-2 validation; the pruned model is saved (a stock checkpoint) to ``--output``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from lit_prune.callbacks.mop import MixtureOfPruners
from lit_prune.datamodules import TextDataModule
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
    return parser


def run_demo(args: list[str]) -> str:
    """Run the demo; returns the dense-vs-pruned table (the CLI prints it).

    Raises:
        SystemExit: if the shared WikiText-2 files are missing (the demo needs them for calibration and PPL).
    """
    opts = demo_parser().parse_args(args)
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
    dense = evaluate_model(module.model, "dense", windows, source, latency_kwargs=proto.latency_kwargs())
    mop = MixtureOfPruners(target=opts.target, proxy=opts.proxy, verbose=1)
    mop_start = time.perf_counter()
    plans = mop.prune_all(module, data.calibration_dataloader(n=opts.holdout, seed=1))
    mop_seconds = time.perf_counter() - mop_start
    pruned = evaluate_model(
        module.model, f"MoP {opts.target:.0%}", windows, source, latency_kwargs=proto.latency_kwargs()
    )
    folder = save_pretrained(module.model, Path(opts.output), tokenizer=module.tokenizer, plans=plans)
    steps = ", ".join(f"{s['branch']}:{s['params_after'] / 1e6:.1f}M" for s in mop.trajectory)
    table = "\n".join(
        [
            format_table([dense, pruned]),
            "",
            f"MoP path ({len(mop.trajectory)} steps; L = a block removed, G = heads + neurons): {mop.path}",
            f"steps (branch:params after): {steps}",
            f"MoP took {mop_seconds:.0f} s (proxy {opts.proxy} on {opts.holdout} held-out windows of wiki.valid.raw); "
            f"the pruned model is in {folder} (plain AutoModelForCausalLM.from_pretrained); whole demo "
            f"{time.perf_counter() - start:.0f} s.",
        ]
    )
    return table
