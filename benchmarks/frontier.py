"""PPL vs compression of SmolLM2-135M-Instruct at 10/20/30/40% of all parameters removed, no recovery (CPU protocol).

Methods, all at matched parameter counts (within one neuron per block):

* MoP with the ``ppl`` proxy (the one the targets are about), the ``kl`` and ``cosine`` proxies, and the ``random``
  proxy (seeds 0, 1, 2);
* depth only: MoP forced to the depth branch (``bi`` re-scored on the current model at every step) — whole blocks
  while a block fits in the budget, then one partial width step for the remainder (< 1 block);
* position only: the same with the paper code's rule (remove the third-to-last block);
* width only: AMP in one shot (uniform ratio, GQA query mode), as ``WidthPruning`` does.

Each MoP curve comes from ONE run to 40%: when a run with a smaller target would stop taking full steps, the run
branches off a copy that finishes that target (what a run started with it does, exactly; tested). Held-out windows
for the proxies and statistics: 8 windows of 256 tokens from wiki.valid.raw (seed 1); the PPL is measured on
another file (wiki.test.raw). Width only is scored on the 32 calibration windows of the CPU protocol. Prints a
table, the MoP paths, wall times, prefill latency at 40%, the issue's
targets, and draws ``benchmarks/frontier.png``.

    .venv/bin/python benchmarks/frontier.py [--targets 0.1 0.2 0.3 0.4] [--json benchmarks/frontier_results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from _timing import alternating

from lit_prune import CPU_PROTOCOL, adapter_for
from lit_prune.allocation import make_width_plan
from lit_prune.criteria.scoring import score_width
from lit_prune.datamodules import TextDataModule
from lit_prune.eval import perplexity
from lit_prune.loading import load_model, load_tokenizer
from lit_prune.mop import MoPSearch
from lit_prune.surgery import apply_plan

HERE = Path(__file__).resolve().parent


def frontier_of(search: MoPSearch, targets: list[float]) -> tuple[dict[float, MoPSearch], float]:
    """Run ``search`` (targeting the largest of ``targets``), branching off a finished search for every target."""
    finished: dict[float, MoPSearch] = {}
    start = time.perf_counter()
    for target in sorted(targets):
        if target == max(targets):
            search.run()
            finished[target] = search
            continue
        while search.full_step_fits(target):
            search.step()
        fork = search.branch_off(target)
        fork.run()
        finished[target] = fork
    return finished, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--holdout", type=int, default=8, help="held-out windows for MoP's proxy and statistics")
    parser.add_argument("--json", default=str(HERE / "frontier_results.json"))
    parser.add_argument("--png", default=str(HERE / "frontier.png"))
    args = parser.parse_args()
    proto = CPU_PROTOCOL
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(proto.describe())
    tokenizer = load_tokenizer(proto.model)
    dense = load_model(proto.model).eval()
    ad = adapter_for(dense)
    data = TextDataModule(tokenizer=tokenizer, val_path=str(proto.eval_path()),
                          calibration_path=str(proto.calibration_path()), seq_len=proto.seq_len,
                          max_val_windows=proto.eval_windows, calibration_windows=proto.calibration_windows,
                          calibration_seed=proto.calibration_seed, batch_size=4)
    windows = data.windows("val")
    holdout = list(data.calibration_dataloader(n=args.holdout, seed=1))
    calib = list(data.calibration_dataloader())
    total = ad.total_params(dense)

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in calib:
            dense(input_ids=batch["input_ids"], use_cache=False)
    calib_pass = time.perf_counter() - start
    dense_ppl = perplexity(dense, windows, progress=False)
    print(f"dense: PPL {dense_ppl:.3f}, {total:,} params; one forward over the {len(calib) * 4} calibration windows: "
          f"{calib_pass:.1f} s; MoP held-out windows: {args.holdout}")

    runs: dict[str, dict[float, MoPSearch]] = {}
    seconds: dict[str, float] = {}
    top = max(args.targets)
    settings: dict[str, dict[str, Any]] = {
        "MoP (ppl)": dict(proxy="ppl"),
        "MoP (kl)": dict(proxy="kl"),
        "MoP (cosine)": dict(proxy="cosine"),
        **{f"MoP (random, seed {s})": dict(proxy="random", seed=s) for s in (0, 1, 2)},
        "depth only (bi)": dict(branches="L"),
        "position only": dict(branches="L", depth_criterion="position"),
    }
    for label, kwargs in settings.items():
        search = MoPSearch(copy.deepcopy(dense), holdout, top, **kwargs)
        runs[label], seconds[label] = frontier_of(search, args.targets)
        print(f"{label}: {seconds[label]:.0f} s to {top:.0%}; paths " + ", ".join(
            f"{t:.0%} {s.path}" for t, s in runs[label].items()), flush=True)

    # MoP to 30%: the wall time of its steps (the first includes the initial statistics pass)
    mop_runs = runs["MoP (ppl)"]
    mop30 = sum(step.seconds for step in mop_runs[0.3].trajectory) if 0.3 in mop_runs else float("nan")

    amp_scores = score_width(dense, calib, "amp", progress=False)
    results: dict[str, Any] = {"dense_ppl": dense_ppl, "params": total, "calibration_pass_s": calib_pass,
                               "mop_to_30_s": mop30, "rows": [], "seconds": seconds}
    print("\n| removed (target) | method | PPL | params | removed (actual) | path |\n|---|---|---|---|---|---|")
    table: dict[str, dict[float, float]] = {}
    for target in sorted(args.targets):
        models: dict[str, tuple[torch.nn.Module, str]] = {
            label: (runs[label][target].hf_model, runs[label][target].path) for label in runs
        }
        width_model = copy.deepcopy(dense)
        apply_plan(width_model, make_width_plan(dense, amp_scores, target, gqa="query", allocation="uniform"))
        models["width only (AMP)"] = (width_model, "one shot")
        for label, (model, path) in models.items():
            ppl = perplexity(model, windows, progress=False)
            params = ad.total_params(model)
            table.setdefault(label, {})[target] = ppl
            print(f"| {target:.0%} | {label} | {ppl:.2f} | {params / 1e6:.2f} M | {100 * (1 - params / total):.2f}% | "
                  f"{path} |", flush=True)
            results["rows"].append({"target": target, "method": label, "ppl": ppl, "params": params, "path": path})

    mop_top = runs["MoP (ppl)"][top].hf_model
    timing = alternating(mop_top, dense)
    ratio = {"b1": timing["r1"], "b8": timing["r8"], "decode": timing["rdec"]}
    results["latency_at_top"] = ratio
    print(f"\nMoP (ppl) at {top:.0%}: prefill latency {100 * (ratio['b1'] - 1):+.1f}% at batch 1, "
          f"{100 * (ratio['b8'] - 1):+.1f}% at batch 8; decode {ratio['decode']:.2f}x dense tok/s "
          f"(the paper: -39% end-to-end latency at 40% on LLaMA-2-7B, RTX 4090)")
    ok = all(table["MoP (ppl)"][t] <= min(table["depth only (bi)"][t], table["width only (AMP)"][t])
             for t in args.targets)
    print("MoP (ppl) <= min(depth only, width only) at every compression: " + ("met" if ok else "NOT met") + "; "
          + ", ".join(f"{t:.0%}: {table['MoP (ppl)'][t]:.1f} vs {table['depth only (bi)'][t]:.1f} / "
                      f"{table['width only (AMP)'][t]:.1f}" for t in sorted(args.targets)))
    print(f"MoP to 30% wall time {mop30:.0f} s = {mop30 / calib_pass:.1f}x one forward over the calibration set "
          f"({calib_pass:.1f} s): {'met' if mop30 <= 10 * calib_pass else 'NOT met'} (<= 10x)")
    Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    plot(table, dense_ppl, args.png)


def plot(table: dict[str, dict[float, float]], dense_ppl: float, path: str) -> None:
    """PPL (log scale) vs fraction of parameters removed, one line per method; MoP random as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    randoms = [label for label in table if label.startswith("MoP (random")]
    xs = sorted(next(iter(table.values())))
    if randoms:
        lo = [min(table[r][x] for r in randoms) for x in xs]
        hi = [max(table[r][x] for r in randoms) for x in xs]
        ax.fill_between([100 * x for x in xs], lo, hi, alpha=0.2, color="gray", label="MoP (random proxy, 3 seeds)")
    for label, values in table.items():
        if label in randoms:
            continue
        ax.plot([100 * x for x in xs], [values[x] for x in xs], marker="o", label=label,
                linewidth=2.5 if label == "MoP (ppl)" else 1.5)
    ax.axhline(dense_ppl, color="black", linestyle=":", label=f"dense ({dense_ppl:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("parameters removed (% of all)")
    ax.set_ylabel("WikiText-2 PPL (32 x 256 tokens)")
    ax.set_title("SmolLM2-135M-Instruct, no recovery")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
