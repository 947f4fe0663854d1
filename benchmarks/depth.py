"""Depth pruning on SmolLM2-135M-Instruct under the CPU protocol: every criterion at 3, 6 and 9 removed blocks.

Prints, per criterion and k: WikiText-2 test PPL (first 32 windows of 256 tokens), parameters removed (% of all
and of non-embedding), prefill latency ratio to dense at batch 1 and 8 (128-token prompts; dense and pruned timed
alternately, 3 rounds of 3 repeats, median ratio); then the cost of the one-pass scoring
(all one-pass depth criteria together, and every depth and width statistic in one driver pass) as a ratio to a
plain forward over the same calibration batches, the memory of
the statistics at 16 vs 64 calibration windows, and the issue's targets with met / NOT met.

    .venv/bin/python benchmarks/depth.py [--ks 3 6 9] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

from lit_prune import CPU_PROTOCOL, adapter_for
from lit_prune.allocation import make_depth_plan
from lit_prune.criteria.depth import ONE_PASS, consensus, needs_for
from lit_prune.criteria.scoring import score_blocks
from lit_prune.datamodules import TextDataModule
from lit_prune.eval import latency, perplexity
from lit_prune.loading import load_model, load_tokenizer
from lit_prune.stats import WIDTH_NEEDS, collect_depth_statistics
from lit_prune.stats.collect import StatisticsRequest, collect_statistics
from lit_prune.surgery import apply_plan

SINGLE = ["bi", "angular", "angular_block", "cka", "cka_all", "cka_global", "cosine_global", "kl_global"]
GLOBAL = ("cka_global", "cosine_global", "kl_global")
CONTROLS = ["reversed"]
RANDOM_SEEDS = (0, 1, 2)


def state_bytes(metric: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in metric.metric_state.values() if isinstance(t, torch.Tensor))


def plain_forward_seconds(model: torch.nn.Module, loader) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            model(input_ids=batch["input_ids"], use_cache=False)
    return time.perf_counter() - start


def prefill_ratios(dense: torch.nn.Module, pruned: torch.nn.Module, rounds: int = 3) -> dict[int, float]:
    """Median over ``rounds`` of pruned/dense prefill latency, dense and pruned measured alternately."""
    ratios: dict[int, list[float]] = {1: [], 8: []}
    kwargs = {"prompt_len": CPU_PROTOCOL.latency_prompt_len, "batch_sizes": (1, 8), "new_tokens": 1, "repeats": 3}
    for _ in range(rounds):
        d = latency(dense, **kwargs)
        p = latency(pruned, **kwargs)
        for b in ratios:
            ratios[b].append(p.prefill_ms[b] / d.prefill_ms[b])
    return {b: statistics.median(r) for b, r in ratios.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--quick", action="store_true", help="8 eval windows, no global criteria (smoke run)")
    parser.add_argument("--cost-only", action="store_true", help="only the scoring cost and statistics memory")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    proto = CPU_PROTOCOL
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(proto.describe())

    tokenizer = load_tokenizer(proto.model)
    model = load_model(proto.model).eval()
    ad = adapter_for(model)
    data = TextDataModule(tokenizer=tokenizer, val_path=str(proto.eval_path()),
                          calibration_path=str(proto.calibration_path()), seq_len=proto.seq_len,
                          max_val_windows=8 if args.quick else proto.eval_windows,
                          calibration_windows=proto.calibration_windows, calibration_seed=proto.calibration_seed)
    windows = data.windows("val")
    calib = data.calibration_dataloader()
    singles = [c for c in SINGLE if not (args.quick and c.endswith("_global"))]

    # --- cost of the one-pass scoring vs a plain forward, same batches (interleaved, median of 3) ---
    needs = needs_for(ONE_PASS)
    every_need = needs_for(("bi", "angular", "cka", "cka_all"))
    every_stat = StatisticsRequest(depth=every_need, width=WIDTH_NEEDS, linear={"input_sq"})
    with_hessian = StatisticsRequest(depth=every_need, width=WIDTH_NEEDS, linear={"input_sq", "hessian"})
    plain, scoring, scoring_all, scoring_every, scoring_hessian = [], [], [], [], []
    for _ in range(3):
        plain.append(plain_forward_seconds(model, calib))
        start = time.perf_counter()
        collect_depth_statistics(model, calib, needs, progress=False)
        scoring.append(time.perf_counter() - start)
        start = time.perf_counter()
        collect_depth_statistics(model, calib, every_need, progress=False)
        scoring_all.append(time.perf_counter() - start)
        start = time.perf_counter()
        collect_statistics(model, calib, every_stat)
        scoring_every.append(time.perf_counter() - start)
        start = time.perf_counter()
        collect_statistics(model, calib, with_hessian)
        scoring_hessian.append(time.perf_counter() - start)
    base = statistics.median(plain)
    cost_ratio = statistics.median(scoring) / base
    cost_ratio_all = statistics.median(scoring_all) / base
    cost_ratio_every = statistics.median(scoring_every) / base
    cost_ratio_hessian = statistics.median(scoring_hessian) / base
    worst = max(cost_ratio, cost_ratio_all, cost_ratio_every)
    print(f"scoring cost / plain forward ({base:.2f} s): bi+angular+cka {cost_ratio:.2f}x, "
          f"every one-pass depth statistic (+cka_all) {cost_ratio_all:.2f}x, every depth, width and Wanda "
          f"statistic in one pass {cost_ratio_every:.2f}x ({'met' if worst <= 1.3 else 'NOT met'} <= 1.3x); "
          f"the same plus SparseGPT's per-Linear Hessians {cost_ratio_hessian:.2f}x "
          f"({'met' if cost_ratio_hessian <= 1.3 else 'NOT met'} <= 1.3x)")

    # --- statistics memory at 16 vs 64 windows ---
    mem = {}
    for n in (16, 64):
        loader = data.calibration_dataloader(n=n)
        mem[n] = state_bytes(collect_depth_statistics(model, loader, every_need, progress=False))
    print(f"statistics memory (every one-pass statistic): {mem[16] / 2**20:.1f} MiB at 16 windows, "
          f"{mem[64] / 2**20:.1f} MiB at 64 ({'met' if mem[16] == mem[64] else 'NOT met'})")
    if args.cost_only:
        return

    # --- scores: one pass for the one-pass criteria + consensus, one global pass (scores do not depend on k,
    #     except angular_block, whose window is k) ---
    timings = {}
    start = time.perf_counter()
    scores = score_blocks(model, calib, "consensus", consensus_of=ONE_PASS, progress=False)
    timings["one-pass + consensus"] = time.perf_counter() - start
    if "cka_global" in singles:
        start = time.perf_counter()
        glob = score_blocks(model, calib, "consensus", consensus_of=GLOBAL, progress=False)  # one global pass
        scores.update({name: glob[name] for name in GLOBAL})
        scores["consensus_global"] = glob["consensus"]
        timings["global pass (3 criteria)"] = time.perf_counter() - start
    scores.update(score_blocks(model, calib, "cka_all", progress=False))
    scores["consensus+cka_all"] = consensus({c: scores[c] for c in ("bi", "angular", "cka", "cka_all")})
    scores["reversed"] = -scores["bi"]

    dense_ppl = perplexity(model, windows, progress=False)
    lat_kwargs = proto.latency_kwargs()
    dense_lat = latency(model, **lat_kwargs)
    dense_total, dense_nonemb = ad.total_params(model), ad.non_embedding_params(model)
    print(f"\ndense: PPL {dense_ppl:.3f}; prefill b1 {dense_lat.prefill_ms[1]:.1f} ms, "
          f"b8 {dense_lat.prefill_ms[8]:.1f} ms; scoring timings {timings}")

    results: dict = {"dense_ppl": dense_ppl, "rows": [], "cost_ratio": cost_ratio, "stats_bytes": mem}
    print("\n| k | criterion | PPL | removed (all) | removed (non-emb) | prefill b1 ratio | prefill b8 ratio "
          "| blocks |")
    print("|---|---|---|---|---|---|---|---|")
    for k in args.ks:
        lat_ratio = None
        per_k: dict[str, float] = {}
        names = [*singles, "consensus", "consensus+cka_all",
                 *(["consensus_global"] if "consensus_global" in scores else []), *CONTROLS]
        names += [f"random:{s}" for s in RANDOM_SEEDS]
        for name in names:
            if name.startswith("random:"):
                s = score_blocks(model, calib, "random", seed=int(name.split(":")[1]), progress=False)["random"]
            elif name == "angular_block":
                s = score_blocks(model, calib, "angular_block", n=k, progress=False)["angular_block"]
            else:
                s = scores[name]
            plan = make_depth_plan(model, s, num_remove=k, method=f"depth:{name}")
            pruned = copy.deepcopy(model)
            apply_plan(pruned, plan)
            ppl = perplexity(pruned, windows, progress=False)
            per_k[name] = ppl
            if lat_ratio is None:  # the architecture (and so the speed) is the same for every criterion at this k
                lat_ratio = prefill_ratios(model, pruned)
            frac_all = 1 - ad.total_params(pruned) / dense_total
            frac_non = 1 - ad.non_embedding_params(pruned) / dense_nonemb
            print(f"| {k} | {name} | {ppl:.2f} | {100 * frac_all:.1f}% | {100 * frac_non:.1f}% | "
                  f"{lat_ratio[1]:.3f} | {lat_ratio[8]:.3f} | {list(plan.drop_layers)} |")
            results["rows"].append({"k": k, "criterion": name, "ppl": ppl, "frac_all": frac_all,
                                    "frac_non_embedding": frac_non, "prefill_ratio": lat_ratio,
                                    "drop_layers": list(plan.drop_layers)})
            del pruned
        best_name = min(singles, key=lambda c: per_k[c])
        gap = per_k["consensus"] / per_k[best_name] - 1
        frac_non = results["rows"][-1]["frac_non_embedding"]
        drop_needed = 0.8 * frac_non
        print(f"k={k}: best single {best_name} PPL {per_k[best_name]:.2f}; consensus {per_k['consensus']:.2f} "
              f"({100 * gap:+.1f}%: {'met' if gap <= 0.05 else 'NOT met'} <= +5%); random mean "
              f"{statistics.mean(per_k[f'random:{s}'] for s in RANDOM_SEEDS):.1f}; prefill drop b1 "
              f"{1 - lat_ratio[1]:.3f}, b8 {1 - lat_ratio[8]:.3f} vs needed {drop_needed:.3f} "
              f"({'met' if min(1 - lat_ratio[1], 1 - lat_ratio[8]) >= drop_needed else 'NOT met'})")

    print(f"\none-pass scoring (bi + angular + cka, all statistics in one pass) / plain forward over the same "
          f"{proto.calibration_windows} windows: {cost_ratio:.2f}x ({'met' if cost_ratio <= 1.3 else 'NOT met'} "
          f"<= 1.3x); plain {statistics.median(plain):.2f} s, scoring {statistics.median(scoring):.2f} s")
    print(f"statistics memory: {mem[16] / 2**20:.1f} MiB at 16 windows, {mem[64] / 2**20:.1f} MiB at 64 windows "
          f"({'met' if mem[16] == mem[64] else 'NOT met'}: independent of calibration size)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
