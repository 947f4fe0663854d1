"""Width pruning on SmolLM2-135M-Instruct under the CPU protocol: every width method at 10, 20 and 30% of all params.

Methods: ``amp`` (query and group GQA modes, uniform and global allocation), ``amp_act`` (the paper code's neuron
score, activation only), ``magnitude``, ``wanda_sp`` and ``random`` (uniform, query mode), and Torch-Pruning's
magnitude LLM width pruning at a matched parameter count (optional: ``pip install --no-deps torch-pruning==1.6.1``;
skipped with a note when missing).

Prints, per ratio and method: WikiText-2 test PPL (first 32 windows of 256 tokens), parameters (and % removed of
all and of non-embedding), prefill latency at batch 1 and 8 (128-token prompt) and decode tokens/s (32 tokens,
batch 1), each as measured and as a ratio to dense timed alternately in the same run (median of 3 rounds). Rows
with the same per-block shapes share one timing. Then the issue's targets with met / NOT met.

    .venv/bin/python benchmarks/width.py [--ratios 0.1 0.2 0.3] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import alternating  # noqa: E402

from lit_prune import CPU_PROTOCOL, adapter_for  # noqa: E402
from lit_prune.allocation import make_width_plan  # noqa: E402
from lit_prune.criteria.scoring import score_width  # noqa: E402
from lit_prune.datamodules import TextDataModule  # noqa: E402
from lit_prune.eval import latency, perplexity  # noqa: E402
from lit_prune.loading import load_model, load_tokenizer  # noqa: E402
from lit_prune.surgery import (
    apply_plan,  # noqa: E402
    block_shapes,  # noqa: E402
)

# (label, criterion, gqa, allocation)
METHODS: list[tuple[str, str, str, str]] = [
    ("amp query uniform", "amp", "query", "uniform"),
    ("amp_act query uniform", "amp_act", "query", "uniform"),
    ("amp group uniform", "amp", "group", "uniform"),
    ("amp query global", "amp", "query", "global"),
    ("amp group global", "amp", "group", "global"),
    ("magnitude", "magnitude", "query", "uniform"),
    ("wanda_sp", "wanda_sp", "query", "uniform"),
    ("random", "random", "query", "uniform"),
]


def torch_pruning_row(model: torch.nn.Module, target_params: int, calib_ids: torch.Tensor) -> tuple[Any, dict]:
    """Torch-Pruning magnitude width pruning on a copy, matched to ``target_params``: (model, info) or (None, note)."""
    try:
        from baselines.torch_pruning_width import prune_to_params
    except ImportError as err:  # the optional benchmark dependency
        return None, {"note": f"Torch-Pruning unavailable: {err}"}
    pruned = copy.deepcopy(model)
    try:
        info = prune_to_params(pruned, calib_ids, target_params)
    except ImportError as err:
        return None, {"note": f"Torch-Pruning unavailable: {err}"}
    return pruned, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--quick", action="store_true", help="8 eval windows, 8 calibration windows, 1 timing round")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    proto = CPU_PROTOCOL
    rounds = 1 if args.quick else 3
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(proto.describe())

    tokenizer = load_tokenizer(proto.model)
    model = load_model(proto.model).eval()
    ad = adapter_for(model)
    data = TextDataModule(
        tokenizer=tokenizer,
        val_path=str(proto.eval_path()),
        calibration_path=str(proto.calibration_path()),
        seq_len=proto.seq_len,
        max_val_windows=8 if args.quick else proto.eval_windows,
        calibration_windows=8 if args.quick else proto.calibration_windows,
        calibration_seed=proto.calibration_seed,
    )
    windows = data.windows("val")
    calib = data.calibration_dataloader()
    calib_ids = next(iter(calib))["input_ids"][:1]

    dense_total, dense_nonemb = ad.total_params(model), ad.non_embedding_params(model)
    dense_ppl = perplexity(model, windows, progress=False)
    dense_lat = latency(model, **proto.latency_kwargs())
    print(
        f"\ndense: PPL {dense_ppl:.3f}; params {dense_total:,} ({dense_nonemb:,} non-embedding); prefill b1 "
        f"{dense_lat.prefill_ms[1]:.1f} ms, b8 {dense_lat.prefill_ms[8]:.1f} ms; decode "
        f"{dense_lat.decode_tokens_per_s:.1f} tok/s"
    )

    # scores do not depend on the ratio: one pass per criterion
    scores, score_seconds = {}, {}
    for criterion in sorted({m[1] for m in METHODS}):
        start = time.perf_counter()
        scores[criterion] = score_width(model, calib, criterion, seed=0, progress=False)
        score_seconds[criterion] = time.perf_counter() - start
    print("scoring seconds: " + ", ".join(f"{c} {s:.1f}" for c, s in score_seconds.items()))

    results: dict[str, Any] = {
        "dense_ppl": dense_ppl,
        "dense_params": dense_total,
        "rows": [],
        "dense_latency": dense_lat.as_dict(),
        "score_seconds": score_seconds,
    }
    timing_cache: dict[tuple, dict[str, Any]] = {}
    header = (
        "| ratio | method | PPL | params | removed all / non-emb | prefill b1 ms (ratio) | prefill b8 ms (ratio) "
        "| decode tok/s (ratio) | widths (heads/KV/MLP per block) |"
    )
    print("\n" + header + "\n|" + "---|" * 9)
    for ratio in args.ratios:
        per: dict[str, dict[str, Any]] = {}
        for label, criterion, gqa, allocation in METHODS:
            plan = make_width_plan(
                model, scores[criterion], ratio, gqa=gqa, allocation=allocation, method=f"width:{criterion}"
            )
            pruned = copy.deepcopy(model)
            apply_plan(pruned, plan)
            per[label] = {"model": pruned, "plan": plan}
        target = per["amp query uniform"]["model"]
        if not args.no_torch_pruning:
            tp_model, info = torch_pruning_row(model, ad.total_params(target), calib_ids)
            if tp_model is None:
                print(f"ratio {ratio}: Torch-Pruning skipped ({info['note']})")
            else:
                per["torch-pruning"] = {"model": tp_model, "plan": None, "info": info}
        for label, entry in per.items():
            pruned = entry["model"]
            ppl = perplexity(pruned, windows, progress=False)
            shapes = tuple(block_shapes(pruned))
            if shapes not in timing_cache:
                timing_cache[shapes] = alternating(pruned, model, rounds)
            t = timing_cache[shapes]
            total, nonemb = ad.total_params(pruned), ad.non_embedding_params(pruned)
            frac_all, frac_non = 1 - total / dense_total, 1 - nonemb / dense_nonemb
            distinct = sorted({(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size) for s in shapes})
            widths = "/".join(f"{h}-{k}-{i}" for h, k, i in distinct[:3]) + (" ..." if len(distinct) > 3 else "")
            print(
                f"| {ratio:.0%} | {label} | {ppl:.2f} | {total / 1e6:.2f} M | {100 * frac_all:.1f}% / "
                f"{100 * frac_non:.1f}% | {t['p1']:.1f} ({t['r1']:.3f}) | {t['p8']:.0f} ({t['r8']:.3f}) | "
                f"{t['dec']:.1f} ({t['rdec']:.3f}) | {widths} |",
                flush=True,
            )
            row = {
                "ratio": ratio,
                "method": label,
                "ppl": ppl,
                "params": total,
                "frac_all": frac_all,
                "frac_non_embedding": frac_non,
                "timing": t,
                "widths": [list(d) for d in distinct],
            }
            if entry.get("info"):
                row["torch_pruning"] = {k: v for k, v in entry["info"].items() if isinstance(v, (int, float, str))}
            results["rows"].append(row)
            entry["ppl"], entry["row"] = ppl, row
        amp_ppl = per["amp query uniform"]["ppl"]
        rivals = [m for m in ("magnitude", "random", "torch-pruning") if m in per]
        beaten = all(amp_ppl < per[m]["ppl"] for m in rivals)
        best_amp = min((lbl for lbl in per if lbl.startswith("amp")), key=lambda lbl: per[lbl]["ppl"])
        row = per["amp query uniform"]["row"]
        need = 0.7 * row["frac_non_embedding"]
        drops = (1 - row["timing"]["r1"], 1 - row["timing"]["r8"])
        print(
            f"ratio {ratio:.0%}: amp (query, uniform) PPL {amp_ppl:.2f} vs "
            + ", ".join(f"{m} {per[m]['ppl']:.2f}" for m in rivals)
            + f" -> {'met' if beaten else 'NOT met'} (amp beats all); best amp variant: {best_amp} "
            f"{per[best_amp]['ppl']:.2f}; prefill drop b1 {drops[0]:.3f}, b8 {drops[1]:.3f} vs needed {need:.3f} "
            f"(0.7 x {row['frac_non_embedding']:.3f}) -> {'met' if min(drops) >= need else 'NOT met'}",
            flush=True,
        )
        for entry in per.values():
            del entry["model"]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
