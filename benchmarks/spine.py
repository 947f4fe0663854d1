"""Behaviour fingerprints of every pruning method: the plans and masks a refactor must leave unchanged.

For one model and one calibration sample this prints ONE JSON object whose ``items`` are exact fingerprints:

* depth: the removed blocks of every depth criterion at ``k`` blocks (``consensus`` also with block 0 protected);
  the three ``*_global`` criteria come from one shared global pass (their metrics are computed independently from
  the same candidate outputs, so this equals three separate calls and costs a third);
* width: every width criterion x GQA mode (``query`` / ``group``) x allocation (``uniform`` / ``global``), plus
  ``amp`` with ``round_to=8`` (the README's ``WidthPruning``), at a ratio of all parameters: kept heads and neurons
  per block (counts), a sha256 of the kept-index lists and the parameters after;
* MoP: the path (``"GGL..."``), the parameters after every step, a sha256 of every step's plan and the final widths;
* sparsity: Wanda, SparseGPT and magnitude masks (uniform, OWL, 2:4, ...): a sha256 over the keep masks in module
  order, a short sha256 per block, and the kept weights of every Linear.

``info`` holds what is not compared (decision margins, proxy values, rounded scores, timings): it says how close a
call was when an item differs. ``--compare FILE`` recomputes and prints ``identical`` / ``DIFFERS`` per item of FILE
(exit status 1 on any difference). Only public functional APIs are used (``score_blocks``, ``make_depth_plan``,
``score_width``, ``make_width_plan``, ``MoPSearch``, ``prune_sparse``), imported through a fallback chain.

SmolLM2 (default): float32 ``builtin:smollm2-135m-instruct``; depth (k = 6), width (20%) and sparsity (50%, 2:4)
are calibrated on ``--calib-windows`` (default 8) windows of the CPU protocol's ``seq_len`` (256) from
wiki.valid.raw drawn with the protocol's seed 0, in batches of 4; MoP 25% runs ``MoPSearch`` with the ``ppl`` proxy
(the cheapest measured proxy; every other option at its default) on ``--holdout-windows`` (default 8) windows of
wiki.valid.raw drawn with seed 1, exactly as ``lit-prune demo`` does (the path it records in RESULTS.md).
Measured on 2 shared cores from commit 7d15382: 11.3 min with light load from other jobs, 27 min with two other
SmolLM2 jobs on the same cores (the global depth pass and MoP take most of it; ``--no-global`` drops the former).
``--tiny``: the seeded tiny random LLaMA of ``tests/conftest.py`` (8 blocks, GQA, head_dim != hidden / heads) with
seeded random token batches, the items that ``tests/test_spine_pins.py`` pins (``tests/data/spine_pins.json``).

    .venv/bin/python benchmarks/spine.py [--tiny] [--out FILE] [--compare FILE] [--no-global]
    .venv/bin/python benchmarks/spine.py --compare benchmarks/spine_baseline.json   # after a refactor
"""

from __future__ import annotations

import argparse
import base64
import copy
import functools
import hashlib
import importlib
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import lit_prune

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _first(name: str, *modules: str) -> Any:
    """``name`` from the first of ``modules`` that has it (public import paths may move in a refactor)."""
    for module in modules:
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"{name} not found in any of {modules}")


score_blocks = _first("score_blocks", "lit_prune.criteria.scoring", "lit_prune.criteria.depth", "lit_prune.criteria")
make_depth_plan = _first(
    "make_depth_plan", "lit_prune.allocation", "lit_prune.surgery", "lit_prune.plan", "lit_prune.depth", "lit_prune"
)
score_width = _first("score_width", "lit_prune.criteria.scoring", "lit_prune.criteria.width", "lit_prune.criteria")
make_width_plan = _first("make_width_plan", "lit_prune.allocation", "lit_prune.allocation.structured")
MoPSearch = _first("MoPSearch", "lit_prune.mop", "lit_prune.mop.search")
prune_sparse = _first("prune_sparse", "lit_prune.sparse", "lit_prune.sparse.prune")

DEPTH = (
    "bi",
    "angular",
    "angular_block",
    "cka",
    "cka_all",
    "cka_global",
    "cosine_global",
    "kl_global",
    "consensus",
    "random",
    "reversed",
)
GLOBAL = ("cka_global", "cosine_global", "kl_global")
WIDTH = ("amp", "amp_act", "magnitude", "wanda_sp", "random", "reversed")
GQA = ("query", "group")
ALLOCATIONS = ("uniform", "global")

Batches = list[dict[str, torch.Tensor]]


@dataclass
class Spec:
    """What to fingerprint: the sizes of every method and which variants run."""

    depth_k: int
    width_ratios: tuple[float, ...]
    mop_target: float
    sparsity: float
    calibration_windows: int
    depth_criteria: tuple[str, ...] = DEPTH
    mop_runs: dict[str, dict[str, Any]] = field(default_factory=lambda: {"ppl": {"proxy": "ppl"}})
    sparse_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    tolerant: dict[str, float] = field(default_factory=dict)
    """Mask items pinned by a property instead of bytes: item name -> the largest fraction of masked weights that
    may change (near ties that flip with the CPU kernels, see ``TINY_TOLERANT``)."""


# label -> prune_sparse keyword arguments (sparsity added unless n_m is given)
SMOLLM2_SPARSE: dict[str, dict[str, Any]] = {
    "wanda/uniform": {"criterion": "wanda"},
    "sparsegpt/uniform": {"criterion": "sparsegpt"},
    "magnitude/uniform": {"criterion": "magnitude"},
    "wanda/owl": {"criterion": "wanda", "allocation": "owl"},
    "wanda/2:4": {"criterion": "wanda", "n_m": "2:4"},
    "sparsegpt/2:4": {"criterion": "sparsegpt", "n_m": "2:4"},
}
TINY_SPARSE: dict[str, dict[str, Any]] = {
    **SMOLLM2_SPARSE,
    "sparsegpt/owl": {"criterion": "sparsegpt", "allocation": "owl"},
    "wanda/owl+trim": {"criterion": "wanda", "allocation": "owl", "trim_rows": True},
    "wanda/one_shot": {"criterion": "wanda", "protocol": "one_shot"},
    "sparsegpt/one_shot": {"criterion": "sparsegpt", "protocol": "one_shot"},
}
TINY_MOP: dict[str, dict[str, Any]] = {
    "ppl": {"proxy": "ppl"},
    "kl": {"proxy": "kl"},
    "cosine": {"proxy": "cosine"},
    "random-seed0": {"proxy": "random", "seed": 0},
    "ppl-group": {"proxy": "ppl", "gqa": "group"},
    "depth-only-bi": {"branches": "L"},
    "position-only": {"branches": "L", "depth_criterion": "position"},
}

# Wanda 2:4 on the tiny model is not bit-reproducible across CPU kernels: with ATEN_CPU_CAPABILITY=default (instead
# of AVX2 / AVX-512) one near tie in a group of 4 of block 3 flips, and since pruning is sequential the later blocks
# see other inputs: 146 of 442,368 masked weights (0.033%) differ. Its pin is therefore: the same kept count in every
# Linear (exact) and at most 0.2% of the mask bits changed; a real change of the method moves far more.
TINY_TOLERANT: dict[str, float] = {"sparse/wanda/2:4": 0.002}

# The tiny model of the pins: every width given explicitly, so a change of conftest's defaults cannot move the pins.
TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    tie_word_embeddings=False,
)
TINY_SPEC = Spec(
    depth_k=3,
    width_ratios=(0.2, 0.4),
    mop_target=0.25,
    sparsity=0.5,
    calibration_windows=8,
    mop_runs=TINY_MOP,
    sparse_runs=TINY_SPARSE,
    tolerant=TINY_TOLERANT,
)


def _sha(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _round(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def _quiet(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` with the small-calibration / near-tie / GQA UserWarnings silenced (they are expected here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


# --- fingerprints --------------------------------------------------------------------------------------------------
def kept_lists(plan: dict[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """Every block's kept head and neuron indices of a width plan dict (``to_dict`` form; unchanged blocks in full)."""
    heads_before = plan.get("heads_before") or []
    neurons_before = plan.get("neurons_before") or []
    keep_heads = {int(b): list(v) for b, v in (plan.get("keep_heads") or {}).items()}
    keep_neurons = {int(b): list(v) for b, v in (plan.get("keep_neurons") or {}).items()}
    heads = [sorted(keep_heads.get(b, range(n))) for b, n in enumerate(heads_before)]
    neurons = [sorted(keep_neurons.get(b, range(n))) for b, n in enumerate(neurons_before)]
    return heads, neurons


def width_fingerprint(plan: Any) -> dict[str, Any]:
    """Kept heads / neurons per block (counts), a sha256 of the kept-index lists, and the parameters after."""
    heads, neurons = kept_lists(plan.to_dict())
    return {
        "heads": [len(h) for h in heads],
        "neurons": [len(n) for n in neurons],
        "sha256": _sha({"heads": heads, "neurons": neurons}),
        "params_after": plan.params_after,
    }


def _step_key(plan: dict[str, Any]) -> dict[str, Any]:
    if plan.get("drop_layers"):
        return {"drop_layers": sorted(int(b) for b in plan["drop_layers"])}
    heads, neurons = kept_lists(plan)
    return {"heads": heads, "neurons": neurons}


def block_widths(model: nn.Module) -> list[list[int]]:
    """``[q_proj out, k_proj out, MLP width]`` of every decoder block, read from the Hugging Face modules."""
    layers = model.get_decoder().layers  # type: ignore[operator, union-attr]
    return [
        [layer.self_attn.q_proj.out_features, layer.self_attn.k_proj.out_features, layer.mlp.down_proj.in_features]
        for layer in layers
    ]


def _block_of(name: str) -> str:
    match = re.search(r"\.(\d+)\.", name)
    return match.group(1) if match else "other"


def ordered_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The masks as CPU bool tensors in module order (names the model does not have last, sorted)."""
    order = [name for name, _ in model.named_modules() if name in masks]
    order += sorted(set(masks) - set(order))
    return [(name, masks[name].detach().to("cpu", torch.bool).contiguous()) for name in order]


def mask_fingerprint(model: nn.Module, masks: dict[str, torch.Tensor], tolerance: float | None = None) -> dict:
    """sha256 over the keep masks in module order (shape + bytes of each), a short sha256 per block, and the kept
    weights of every Linear; with ``tolerance`` also the mask bits themselves (packed, base64) for :func:`matches`."""
    digest = hashlib.sha256()
    blocks: dict[str, Any] = {}
    kept: dict[str, int] = {}
    ordered = ordered_masks(model, masks)
    for name, mask in ordered:
        for h in (digest, blocks.setdefault(_block_of(name), hashlib.sha256())):
            h.update(repr(tuple(mask.shape)).encode())
            h.update(mask.numpy().tobytes())
        kept[name] = int(mask.sum())
    out: dict[str, Any] = {
        "sha256": digest.hexdigest(),
        "block_sha256": {b: h.hexdigest()[:16] for b, h in blocks.items()},
        "kept_total": sum(kept.values()),
        "kept": kept,
    }
    if tolerance is not None:
        bits = np.packbits(torch.cat([m.flatten() for _, m in ordered]).numpy())
        out.update(
            tolerance=tolerance,
            bits=int(sum(m.numel() for _, m in ordered)),
            packed=base64.b64encode(zlib.compress(bits.tobytes(), 9)).decode(),
        )
    return out


def changed_fraction(saved: dict[str, Any], fresh: dict[str, Any]) -> float:
    """The fraction of mask bits that differ between two tolerance fingerprints (1.0 when the sizes differ)."""
    if saved.get("bits") != fresh.get("bits") or "packed" not in fresh:
        return 1.0
    a, b = (np.frombuffer(zlib.decompress(base64.b64decode(x["packed"])), dtype=np.uint8) for x in (saved, fresh))
    return int(np.unpackbits(a ^ b).sum()) / saved["bits"]


def matches(saved: Any, fresh: Any) -> bool:
    """Whether a fresh item reproduces a saved one: equal, or for a tolerance item the same kept count in every
    Linear and at most ``tolerance`` of the mask bits changed."""
    if saved == fresh:
        return True
    if not isinstance(saved, dict) or "tolerance" not in saved or not isinstance(fresh, dict):
        return False
    return saved["kept"] == fresh.get("kept") and changed_fraction(saved, fresh) <= saved["tolerance"]


# --- the runs ------------------------------------------------------------------------------------------------------
def depth_items(model: nn.Module, calib: Batches, spec: Spec, items: dict, info: dict) -> None:
    k = spec.depth_k
    shared: dict[str, torch.Tensor] = {}
    if any(c in GLOBAL for c in spec.depth_criteria):  # one global pass serves all three (metrics are independent)
        shared = score_blocks(model, calib, "consensus", consensus_of=GLOBAL, progress=False)
    for criterion in spec.depth_criteria:
        if criterion in GLOBAL:
            scores = shared[criterion]
        else:
            scores = score_blocks(model, calib, criterion, n=k, seed=0, progress=False)[criterion]
        variants = [((), f"depth/{criterion}/k={k}")]
        if criterion == "consensus":
            variants.append(((0,), f"depth/{criterion}/k={k}/protect=0"))
        for protect, name in variants:
            plan = _quiet(
                make_depth_plan,
                model,
                scores,
                num_remove=k,
                protect=protect,
                method=f"depth:{criterion}",
                calibration_windows=spec.calibration_windows,
            )
            items[name] = {"drop_layers": list(plan.drop_layers)}
            margin = plan.meta.get("decision_margin") or {}
            info[name] = {
                "relative_margin": _round(float(margin.get("relative", math.nan)), 4),
                "scores": [_round(float(s)) for s in scores.tolist()],
            }


def width_items(model: nn.Module, calib: Batches, spec: Spec, items: dict, info: dict) -> None:
    for criterion in WIDTH:
        scores = score_width(model, calib, criterion, seed=0, progress=False)
        runs = [
            (r, gqa, allocation, 1) for r, gqa, allocation in itertools.product(spec.width_ratios, GQA, ALLOCATIONS)
        ]
        if criterion == "amp":  # the README's WidthPruning(..., round_to=8)
            runs += [(r, "query", allocation, 8) for r in spec.width_ratios for allocation in ALLOCATIONS]
        for r, gqa, allocation, round_to in runs:
            name = f"width/{criterion}/{gqa}/{allocation}/{r:.0%}" + (f"/round_to={round_to}" if round_to > 1 else "")
            try:
                plan = _quiet(
                    make_width_plan,
                    model,
                    scores,
                    r,
                    gqa=gqa,
                    allocation=allocation,
                    round_to=round_to,
                    method=f"width:{criterion}",
                )
            except ValueError as err:  # pinned too: an impossible target must stay impossible
                items[name] = {"error": type(err).__name__}
                info[name] = {"message": str(err)}
                continue
            items[name] = width_fingerprint(plan)


def mop_items(model: nn.Module, holdout: Batches, spec: Spec, items: dict, info: dict) -> None:
    t = spec.mop_target
    for label, kwargs in spec.mop_runs.items():
        name = f"mop/{label}/{t:.0%}"
        start = time.perf_counter()
        search = _quiet(MoPSearch, copy.deepcopy(model), holdout, t, **kwargs)
        steps = _quiet(search.run)
        items[name] = {
            "path": search.path,
            "params_after": [int(s.params_after) for s in steps],
            "plans_sha256": _sha([_step_key(s.plan) for s in steps]),
            "final_widths": block_widths(search.hf_model),
        }
        info[name] = {
            "proxy_depth": [_round(s.proxy_depth) for s in steps],
            "proxy_width": [_round(s.proxy_width) for s in steps],
            "seconds": round(time.perf_counter() - start, 1),
        }
        del search


def sparse_items(model: nn.Module, calib: Batches, spec: Spec, items: dict, info: dict) -> None:
    for label, kwargs in spec.sparse_runs.items():
        nm = kwargs.get("n_m")
        name = f"sparse/{label}" if nm else f"sparse/{label}/{spec.sparsity:.0%}"
        pruned = copy.deepcopy(model)
        args = dict(kwargs) if nm else {**kwargs, "sparsity": spec.sparsity}
        start = time.perf_counter()
        result = _quiet(prune_sparse, pruned, calib, **args)
        items[name] = mask_fingerprint(pruned, result.masks, spec.tolerant.get(name))
        weights = [m.weight for n, m in pruned.named_modules() if n in result.masks]
        info[name] = {
            "block_ratios": [_round(float(x)) for x in result.block_ratios],
            "weight_abs_sum": _round(float(sum(w.detach().double().abs().sum() for w in weights)), 9),
            "seconds": round(time.perf_counter() - start, 1),
        }
        del pruned


SECTIONS = ("depth", "width", "mop", "sparse")


def fingerprints(
    model: nn.Module,
    calib: Batches,
    holdout: Batches,
    spec: Spec,
    log: bool = False,
    sections: tuple[str, ...] = SECTIONS,
) -> dict[str, Any]:
    """Every item of ``spec`` in ``sections`` on ``model`` (left unchanged): ``{"items", "info", "seconds"}``."""
    items: dict[str, Any] = {}
    info: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    runs = (
        ("depth", depth_items, calib),
        ("width", width_items, calib),
        ("mop", mop_items, holdout),
        ("sparse", sparse_items, calib),
    )
    for section, run, batches in runs:
        if section not in sections:
            continue
        start = time.perf_counter()
        run(model, batches, spec, items, info)
        seconds[section] = round(time.perf_counter() - start, 1)
        if log:
            print(f"{section}: {seconds[section]:.1f} s", file=sys.stderr, flush=True)
    return {"items": items, "info": info, "seconds": seconds}


# --- the two models ------------------------------------------------------------------------------------------------
def tiny_model() -> nn.Module:
    """The seeded tiny random LLaMA of the pins (``tests/conftest.py``'s ``tiny_config``, widths fixed here)."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(**TINY_CONFIG)).eval()


def tiny_batches(n: int, seed: int, batch: int = 2, seq_len: int = 32) -> Batches:
    """``n`` seeded batches of random token ids (ids 4..255: no special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, 256, (batch, seq_len), generator=g)} for _ in range(n)]


def tiny_fingerprints() -> dict[str, Any]:
    """The pinned run: 4 calibration batches (8 x 32 tokens, seed 0), MoP on 2 held-out batches (seed 1)."""
    return fingerprints(tiny_model(), tiny_batches(4, 0), tiny_batches(2, 1), TINY_SPEC)


def smollm2_run(
    model_name: str, calib_windows: int, holdout_windows: int, no_global: bool, sections: tuple[str, ...] = SECTIONS
) -> dict[str, Any]:
    from lit_prune import CPU_PROTOCOL
    from lit_prune.datamodules import TextDataModule
    from lit_prune.loading import load_model, load_tokenizer

    proto = CPU_PROTOCOL
    start = time.perf_counter()
    tokenizer = load_tokenizer(model_name)
    model = load_model(model_name).eval()
    load_s = time.perf_counter() - start
    data = TextDataModule(
        tokenizer=tokenizer,
        calibration_path=str(proto.calibration_path()),
        seq_len=proto.seq_len,
        calibration_windows=calib_windows,
        calibration_seed=proto.calibration_seed,
        batch_size=4,
    )
    calib = list(data.calibration_dataloader())
    holdout = list(data.calibration_dataloader(n=holdout_windows, seed=1))
    depth = tuple(c for c in DEPTH if not (no_global and c in GLOBAL))
    spec = Spec(
        depth_k=6,
        width_ratios=(0.2,),
        mop_target=0.25,
        sparsity=0.5,
        calibration_windows=calib_windows,
        depth_criteria=depth,
        sparse_runs=SMOLLM2_SPARSE,
    )
    out = fingerprints(model, calib, holdout, spec, log=True, sections=sections)
    out["seconds"]["load"] = round(load_s, 1)
    out["calibration"] = (
        f"{calib_windows} windows of {proto.seq_len} tokens of {proto.calibration_file} (seed "
        f"{proto.calibration_seed}, batches of 4); MoP: {holdout_windows} windows (seed 1), proxy ppl"
    )
    return out


# --- comparison ----------------------------------------------------------------------------------------------------
def describe_difference(saved: Any, fresh: Any, limit: int = 6) -> str:
    """A short account of what changed between two fingerprints (which keys, and the first changed entries)."""
    if fresh is None:
        return "missing from the fresh run"
    if not isinstance(saved, dict) or not isinstance(fresh, dict):
        return f"{saved!r} -> {fresh!r}"
    parts = []
    for key in sorted(set(saved) | set(fresh)):
        a, b = saved.get(key), fresh.get(key)
        if a == b:
            continue
        if key == "packed":
            parts.append(f"mask bits: {changed_fraction(saved, fresh):.4%} changed")
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed = [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            parts.append(
                f"{key} ({len(changed)} entries): "
                + "; ".join(changed[:limit])
                + (" ..." if len(changed) > limit else "")
            )
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            changed = [f"[{i}] {x} -> {y}" for i, (x, y) in enumerate(zip(a, b)) if x != y]
            parts.append(f"{key}: " + "; ".join(changed[:limit]) + (" ..." if len(changed) > limit else ""))
        else:
            parts.append(f"{key}: {a} -> {b}")
    return " | ".join(parts)


def compare(saved: dict[str, Any], fresh: dict[str, Any], sections: tuple[str, ...] = SECTIONS) -> int:
    """Print identical / DIFFERS per saved item of ``sections``; return the number of differences."""
    differences = 0
    names = [name for name in saved["items"] if name.split("/", 1)[0] in sections]
    for name in names:
        a, b = saved["items"][name], fresh["items"].get(name)
        if a == b:
            print(f"identical  {name}")
            continue
        if matches(a, b):
            print(f"identical  {name} (within tolerance: {changed_fraction(a, b):.5%} of the mask bits changed)")
            continue
        differences += 1
        print(f"DIFFERS    {name}: {describe_difference(a, b)}")
        for label, source in (("saved", saved), ("fresh", fresh)):
            if name in source.get("info", {}):
                print(f"           {label} info: {json.dumps(source['info'][name])[:300]}")
    for name in sorted(set(fresh["items"]) - set(saved["items"])):
        print(f"new        {name} (not in the saved file)")
    print(f"{len(names) - differences} identical, {differences} differ")
    return differences


def _commit(package: Path) -> str:
    """The git commit of the checkout holding ``package`` (``+dirty`` when its files differ), or ``unknown``."""
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, check=True, cwd=package, timeout=10)
        head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--", "."]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model of tests/test_spine_pins.py")
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--holdout-windows", type=int, default=8)
    parser.add_argument("--no-global", action="store_true", help="skip cka_global / cosine_global / kl_global")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--compare", type=Path, default=None, help="compare with a saved JSON; exit 1 on a difference")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run (and compare) these sections only"
    )
    args = parser.parse_args(argv)
    sections = tuple(args.only)
    start = time.perf_counter()
    if args.tiny:
        out = tiny_fingerprints()
        out["calibration"] = "tiny: 4 batches of 2 x 32 random ids (seed 0); MoP: 2 batches (seed 1)"
        model = "tiny (tests/conftest.py tiny_config, " + json.dumps(TINY_CONFIG) + ")"
    else:
        out = smollm2_run(args.model, args.calib_windows, args.holdout_windows, args.no_global, sections)
        model = args.model
    out = {
        "model": model,
        "lit_prune_commit": _commit(Path(lit_prune.__file__).resolve().parent),
        "calibration": out.pop("calibration"),
        "lit_prune": str(Path(lit_prune.__file__).resolve().parent),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}",
        "wall_seconds": round(time.perf_counter() - start, 1),
        **out,
    }
    text = json.dumps(out, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    if args.compare:
        saved = json.loads(args.compare.read_text())
        sys.exit(1 if compare(saved, out, sections) else 0)
    if not args.out:
        print(text)
    else:
        print(json.dumps({"items": len(out["items"]), "wall_seconds": out["wall_seconds"], "out": str(args.out)}))


if __name__ == "__main__":
    main()
