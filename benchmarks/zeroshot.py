"""Zero-shot accuracy of SmolLM2-135M-Instruct, dense and after MoP 25% (no recovery), through lm-eval (CPU).

avg-5 = mean ``acc`` over PIQA, HellaSwag (full preprocessed file), WinoGrande, ARC-Easy and ARC-Challenge, on the
first ``--limit`` items of each local file (``lit_prune.eval.zero_shot``: lm-eval 0.4.13's ``HFLM`` on the in-memory
model, local task definitions that follow lm-eval's; see ``lit_prune/eval/tasks.py`` for deviations). ``acc_norm`` is
reported next to it for the tasks that have it. MoP: 25% of all parameters, ``ppl`` proxy on 8 held-out windows of
wiki.valid.raw (seed 1), as ``lit-prune demo``.

    .venv/bin/python benchmarks/zeroshot.py [--limit 200] [--json benchmarks/zeroshot_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from lit_prune import CPU_PROTOCOL, CausalLMModule, adapter_for
from lit_prune.callbacks import MixtureOfPruners
from lit_prune.datamodules import TextDataModule
from lit_prune.eval import zero_shot

HERE = Path(__file__).resolve().parent
TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge")


def row(name: str, model: torch.nn.Module, tokenizer: Any, limit: int, batch_size: int) -> dict[str, Any]:
    """Score ``model`` on the five tasks; print and return its numbers."""
    result = zero_shot(model, tokenizer, tasks=TASKS, limit=limit, batch_size=batch_size)
    params = adapter_for(model).total_params(model)
    out = {"name": name, "params": params, "acc": result.acc, "acc_norm": result.acc_norm, "n_items": result.n_items,
           "avg_acc": result.avg, "seconds": result.seconds}
    print(f"{name}: avg-5 acc {100 * result.avg:.2f} ({params:,} params, {result.seconds:.0f} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--json", default=str(HERE / "zeroshot_results.json"))
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; limit {args.limit} items per task")
    start = time.perf_counter()
    module = CausalLMModule(model=CPU_PROTOCOL.model)
    model, tokenizer = module.model.eval(), module.tokenizer
    rows = [row("dense", model, tokenizer, args.limit, args.batch_size)]
    data = TextDataModule(tokenizer=tokenizer, calibration_path=str(CPU_PROTOCOL.calibration_path()),
                          seq_len=CPU_PROTOCOL.seq_len)
    mop = MixtureOfPruners(target=args.target, proxy="ppl", verbose=0)
    mop.prune_all(module, data.calibration_dataloader(n=8, seed=1))
    rows.append(row(f"MoP {args.target:.0%} ({mop.path})", module.model.eval(), tokenizer, args.limit,
                    args.batch_size))
    print()
    header = " | ".join(f"{t} acc / acc_norm" if t != "winogrande" else "winogrande acc" for t in TASKS)
    print(f"| model | params | {header} | avg-5 acc | eval time |")
    print("|---|---|" + "---|" * len(TASKS) + "---|---|")
    for r in rows:
        cells = []
        for t in TASKS:
            acc, norm = r["acc"][t], r["acc_norm"].get(t)
            cells.append(f"{100 * acc:.1f}" + (f" / {100 * norm:.1f}" if norm is not None else ""))
        print(f"| {r['name']} | {r['params'] / 1e6:.1f} M | " + " | ".join(cells)
              + f" | **{100 * r['avg_acc']:.2f}** | {r['seconds']:.0f} s |")
    print(f"items per task: {rows[0]['n_items']}; total wall {time.perf_counter() - start:.0f} s")
    Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
