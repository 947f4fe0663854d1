"""Recovery after MoP 25% on SmolLM2-135M-Instruct: LoRA on all blocks vs CKA-selected LoRA vs distillation (CPU).

1. The dense model and MoP to 25% of all parameters (ppl proxy, 8 held-out windows of wiki.valid.raw, seed 1; as
   ``lit-prune demo``) are scored on the CPU protocol (first 32 windows of 256 tokens of wiki.test.raw). Both are
   saved to a work folder.
2. Each recovery variant runs in its own process (so its peak RSS is its own): load the pruned model, then
   ``Trainer.fit`` with the LoRA callback for ``--steps`` steps × batch ``--batch-size`` × 256 tokens of
   wiki.valid.raw windows (shuffled, seed 0), merge at the end, and score the merged model on the same test windows:

   * ``lora_all``: LoRA on the 7 projections of every block;
   * ``cka_lora``: CKALoRA, adapters on floor(0.5 · L) blocks chosen by 1 − CKA on 128 training windows;
   * ``cka_lora_distill``: the same plus ``distill=True`` (α = 1, T = 1), the teacher being the dense model.

Prints a table (PPL, trainable parameters, peak RSS, fit wall time: the whole ``Trainer.fit``, i.e. also the CKA
pass and loading the teacher), and checks the targets of issue 6: CKA-LoRA
keeps ≥ 90% of all-block LoRA's PPL improvement with about half its trainable parameters, and recovery closes ≥ 50%
of the gap between the pruned and the dense PPL.

    .venv/bin/python benchmarks/recovery.py [--steps 150] [--batch-size 4] [--json benchmarks/recovery_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lit_prune import CPU_PROTOCOL, CausalLMModule, adapter_for, load_pretrained, save_pretrained
from lit_prune.callbacks import CKALoRA, LoRA, MixtureOfPruners
from lit_prune.datamodules import TextDataModule
from lit_prune.eval import perplexity
from lit_prune.loading import load_tokenizer

HERE = Path(__file__).resolve().parent
VARIANTS = ("lora_all", "cka_lora", "cka_lora_distill")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_windows(tokenizer: Any) -> torch.Tensor:
    """The CPU protocol's evaluation windows."""
    proto = CPU_PROTOCOL
    data = TextDataModule(tokenizer=tokenizer, val_path=str(proto.eval_path()), seq_len=proto.seq_len,
                          max_val_windows=proto.eval_windows)
    return data.windows("val")


def prepare(work: Path, target: float, holdout: int) -> dict[str, Any]:
    """Score the dense model, prune it with MoP, score that, and save both (in safetensors) to ``work``."""
    proto = CPU_PROTOCOL
    module = CausalLMModule(model=proto.model)
    tokenizer = module.tokenizer
    windows = test_windows(tokenizer)
    model = module.model.eval()
    dense_params = adapter_for(model).total_params(model)
    dense_ppl = perplexity(model, windows, progress=False)
    save_pretrained(model, work / "dense", tokenizer=tokenizer)
    data = TextDataModule(tokenizer=tokenizer, calibration_path=str(proto.calibration_path()), seq_len=proto.seq_len)
    mop = MixtureOfPruners(target=target, proxy="ppl", verbose=0)
    start = time.perf_counter()
    plans = mop.prune_all(module, data.calibration_dataloader(n=holdout, seed=1))
    mop_seconds = time.perf_counter() - start
    model = module.model.eval()
    pruned_ppl = perplexity(model, windows, progress=False)
    save_pretrained(model, work / "pruned", tokenizer=tokenizer, plans=plans)
    return {
        "dense_ppl": dense_ppl,
        "dense_params": dense_params,
        "pruned_ppl": pruned_ppl,
        "pruned_params": adapter_for(model).total_params(model),
        "mop_path": mop.path,
        "mop_seconds": mop_seconds,
    }


def run_variant(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Recover the pruned model with one variant; returns its numbers (run in a fresh process)."""
    torch.manual_seed(0)
    proto = CPU_PROTOCOL
    tokenizer = load_tokenizer(str(work / "pruned"))
    model = load_pretrained(work / "pruned")
    rss_loaded = peak_rss_mib()
    module = CausalLMModule(model=model, tokenizer=tokenizer, lr=args.lr)
    lora_args: dict[str, Any] = dict(r=args.r, alpha=args.alpha, dropout=0.05, save_model=False, verbose=1)
    callback: LoRA
    if name == "lora_all":
        callback = LoRA(**lora_args)
    elif name == "cka_lora":
        callback = CKALoRA(ratio=args.ratio, n_samples=128, **lora_args)
    elif name == "cka_lora_distill":
        callback = CKALoRA(ratio=args.ratio, n_samples=128, distill=True, teacher=str(work / "dense"), **lora_args)
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    data = TextDataModule(tokenizer=tokenizer, path=str(proto.calibration_path()), seq_len=proto.seq_len,
                          batch_size=args.batch_size, shuffle=True, seed=0)
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[callback], default_root_dir=str(work / name))
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    attach = callback.attachments[-1]
    recovered = module.model.eval()
    ppl = perplexity(recovered, test_windows(tokenizer), progress=False)
    return {
        "variant": name,
        "ppl": ppl,
        "trainable": attach["trainable"],
        "all_blocks": attach["all_blocks"],
        "layers": attach["layers"],
        "fit_seconds": fit_seconds,
        "steps": trainer.global_step,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_load_mib": rss_loaded,
        "final_train_loss": float(trainer.callback_metrics.get("train_loss", float("nan"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--target", type=float, default=0.25)
    parser.add_argument("--holdout", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--work-dir", default=None, help="where the dense and pruned models are saved (default: tmp)")
    parser.add_argument("--json", default=str(HERE / "recovery_results.json"))
    parser.add_argument("--run-variant", default=None, help=argparse.SUPPRESS)  # internal: one variant, JSON out
    args = parser.parse_args()

    if args.run_variant is not None:
        print("RESULT " + json.dumps(run_variant(args.run_variant, Path(args.work_dir), args)), flush=True)
        return

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(CPU_PROTOCOL.describe())
    print(f"recovery: {args.steps} steps x batch {args.batch_size} x {CPU_PROTOCOL.seq_len} tokens of "
          f"wiki.valid.raw; LoRA r={args.r}, alpha={args.alpha}, dropout 0.05, lr {args.lr} (AdamW), "
          f"7 projections; CKA ratio {args.ratio}, 128 samples")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        base = prepare(work, args.target, args.holdout)
        print(f"dense PPL {base['dense_ppl']:.2f} ({base['dense_params']:,} params); MoP {args.target:.0%} "
              f"(path {base['mop_path']}, {base['mop_seconds']:.0f} s) -> PPL {base['pruned_ppl']:.2f} "
              f"({base['pruned_params']:,} params); prepared in {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for name in args.variants:
            cmd = [sys.executable, __file__, "--run-variant", name, "--work-dir", str(work),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                   "--r", str(args.r), "--alpha", str(args.alpha), "--ratio", str(args.ratio)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(out.stdout[-3000:], out.stderr[-3000:])
                raise SystemExit(f"variant {name} failed (exit {out.returncode})")
            row = json.loads(lines[-1].removeprefix("RESULT "))
            rows.append(row)
            print(f"  {name}: PPL {row['ppl']:.2f}, {row['trainable']:,} trainable, layers {row['layers']}, "
                  f"fit {row['fit_seconds']:.0f} s, peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)

    gap = base["pruned_ppl"] - base["dense_ppl"]
    print()
    print("fit = the whole Trainer.fit (training steps, plus the CKA pass and the teacher load where they apply)")
    print("| variant | WikiText-2 PPL | gap closed | trainable params | blocks with LoRA | peak RSS (MiB) | fit (s) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | {base['dense_ppl']:.2f} | - | - | - | - | - |")
    print(f"| MoP {args.target:.0%}, no recovery | {base['pruned_ppl']:.2f} | 0% | - | - | - | - |")
    for row in rows:
        closed = (base["pruned_ppl"] - row["ppl"]) / gap
        print(f"| {row['variant']} | {row['ppl']:.2f} | {100 * closed:.0f}% | {row['trainable']:,} | "
              f"{len(row['layers'])} | {row['peak_rss_mib']:.0f} | {row['fit_seconds']:.0f} |")
    by_name = {row["variant"]: row for row in rows}
    print()
    if "lora_all" in by_name and "cka_lora" in by_name:
        full, cka = by_name["lora_all"], by_name["cka_lora"]
        gain = base["pruned_ppl"] - full["ppl"]
        kept = (base["pruned_ppl"] - cka["ppl"]) / gain if gain > 0 else float("nan")  # undefined without a gain
        share = cka["trainable"] / full["trainable"]
        print(f"target: CKA-LoRA keeps >= 90% of all-block LoRA's PPL improvement: {100 * kept:.1f}% "
              f"({'met' if kept >= 0.9 else 'NOT met'}), with {100 * share:.0f}% of its trainable parameters")
    for row in rows:
        closed = (base["pruned_ppl"] - row["ppl"]) / gap
        print(f"target: recovery closes >= 50% of the pruned-dense gap: {row['variant']} {100 * closed:.0f}% "
              f"({'met' if closed >= 0.5 else 'NOT met'})")
    Path(args.json).write_text(json.dumps({"args": vars(args), "base": base, "variants": rows}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
