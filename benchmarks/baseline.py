"""Baseline: the dense SmolLM2-135M-Instruct under the CPU protocol, the reference for every pruning result.

Prints parameters, perplexity (with its protocol), prefill latency at batch 1 and 8, decode tokens/s, and checks
that the Trainer path (``Trainer.validate`` -> ``val_ppl``) agrees with ``lit_prune.eval.perplexity`` on the
same windows (the issue asks for 1e-4 relative).

    .venv/bin/python benchmarks/baseline.py [--json benchmarks/baseline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import lightning.pytorch as pl
import torch

from lit_prune import CPU_PROTOCOL, CausalLMModule
from lit_prune.datamodules import TextDataModule
from lit_prune.eval.summary import evaluate_model, format_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    proto = CPU_PROTOCOL
    eval_path, calib_path = proto.eval_path(), proto.calibration_path()
    if eval_path is None or not eval_path.is_file():
        raise SystemExit(f"WikiText-2 not found ({eval_path}); set LIT_PRUNE_DATA_DIR to the shared data folder.")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(proto.describe())

    t0 = time.perf_counter()
    module = CausalLMModule(model=proto.model)
    load_s = time.perf_counter() - t0
    data = TextDataModule(
        tokenizer=module.tokenizer, val_path=str(eval_path), calibration_path=str(calib_path), seq_len=proto.seq_len,
        max_val_windows=proto.eval_windows, calibration_windows=proto.calibration_windows,
        calibration_seed=proto.calibration_seed, batch_size=4,
    )
    data.setup("validate")
    windows = data.windows("val")

    t0 = time.perf_counter()
    summary = evaluate_model(module.model, "SmolLM2-135M (dense)", windows, proto.eval_file,
                             latency_kwargs=proto.latency_kwargs())
    eval_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False)
    (metrics,) = trainer.validate(module, datamodule=data, verbose=False)
    validate_s = time.perf_counter() - t0
    assert summary.ppl is not None
    rel = abs(metrics["val_ppl"] - summary.ppl.ppl) / summary.ppl.ppl

    print()
    print(format_table([summary]))
    print()
    print(f"Trainer.validate val_ppl = {metrics['val_ppl']:.6f}; perplexity() = {summary.ppl.ppl:.6f}; "
          f"relative difference {rel:.2e} (target <= 1e-4: {'met' if rel <= 1e-4 else 'NOT met'})")
    print(f"wall time: load {load_s:.1f} s, eval (PPL + latency) {eval_s:.1f} s, Trainer.validate {validate_s:.1f} s")
    if args.json:
        out = summary.as_dict() | {"trainer_val_ppl": metrics["val_ppl"], "relative_difference": rel}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


if __name__ == "__main__":
    main()
