"""Baseline: Torch-Pruning (DepGraph) magnitude-based *width* pruning of a HF Llama-style causal LM.

This reproduces the recipe of Torch-Pruning's LLM example (``examples/LLMs/prune_llm.py`` in VainF/Torch-Pruning):
``tp.pruner.MetaPruner`` with ``tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")``, local
(per-layer) ranking, ``num_heads={q_proj: H, k_proj: KV, v_proj: KV}``, ``prune_num_heads=True``,
``prune_head_dims=False`` (RoPE stays intact) and ``head_pruning_ratio == pruning_ratio`` -- with one change: the
hidden size (embedding / residual width) is **kept** by adding ``embed_tokens`` to ``ignored_layers`` (TP skips any
group that would prune the output of an ignored layer, and every residual-stream group contains the embedding).
So only attention heads (q_proj rows + o_proj columns) and MLP channels (gate/up rows + down columns) are removed.
A single ratio ``r`` drives both, and it is chosen so that the total parameter count matches a target.

Install (pure Python; needs only ``torch>=2.0`` and ``numpy``, both already in the venv -- do not let pip touch torch)::

    .venv/bin/pip install --no-deps torch-pruning==1.6.1

How Torch-Pruning 1.6.1 treats GQA heads (e.g. SmolLM2-135M: 9 query heads, 3 KV heads, head_dim 64):

* K/V heads are **never** pruned: for a GQA attention group TP empties the index lists of k_proj/v_proj
  (``group[i] = (dep, [])``, "since they will be shared by multiple Q heads").
* Query heads are removed **evenly per KV group**: ``ceil(ceil(r * H) / KV)`` of the lowest-importance query heads
  are removed from each block of ``H / KV`` query heads that share a KV head (local pruning).  Hence the reachable
  query-head counts are multiples of KV.  Pruning down to ONE query head per KV group silently does nothing in
  1.6.1 (after updating its head counter q and k/v have equal head counts, TP no longer treats the group as GQA,
  adds the k/v rows to the pruning indices, and ``check_pruning_group`` rejects the whole group), so at least 2
  query heads per KV group must stay.  For SmolLM2's 9/3 that leaves exactly two options: 9 heads, or 6 heads
  (1 removed per KV group, any ``r`` in ``(0, 1/3]``); we cap the head ratio accordingly.  GQA layouts
  with fewer than 3 query heads per KV group therefore get no head pruning (MLP channels only; the returned ``note``
  says so), and ``H == 2 * KV`` is refused outright (NotImplementedError): TP 1.6.1's dependency-graph construction
  never terminates on repeat_kv with n_rep=2 (seen for 4/2, 6/3, 8/4, 10/5, 2/1; 6/2, 9/3, 8/2, 12/3, 12/4,
  4/1 and MHA are fine).
* Head importance = mean over the head's channels of the group L2 magnitude of q_proj rows and o_proj columns
  (k/v rows do not contribute: their root indices are unmapped in the GQA group).
* Tracing must use ``attn_implementation="eager"``: with SDPA and ``enable_gqa=True`` (transformers >= 5 on CPU),
  the attention kernel is an opaque element-wise node to DepGraph, which couples v_proj (KV*hd channels) with
  q_proj/o_proj (H*hd channels) and crashes (``shape '[H, -1]' is invalid``).  We switch to eager for tracing only
  and restore the original implementation afterwards.

So GQA head pruning works for 9/3 down to 6 query heads (no MLP-only fallback is needed there); ``prune_heads=False``
gives the MLP-only variant.  Because all layers are pruned with the same local ratio, the result is uniform across
layers and the HF config (``num_attention_heads``, ``intermediate_size``) stays valid; ``num_key_value_heads`` and
``head_dim`` are unchanged, and each attention module's ``num_key_value_groups`` is updated.  Checked: the pruned
model's logits equal those of the original with the removed heads' o_proj columns and the removed channels'
down_proj columns zeroed (so the GQA head/KV alignment is right); ``model.generate`` works (SDPA restored).

Measured (SmolLM2-135M-Instruct, fp32, 2 CPU cores, target 80% = 107,612,006 of 134,515,008): r = 0.2539,
6/3 heads, intermediate 1536 -> 1145 in every layer, 107,610,048 params (-1,958, one MLP-channel step is 51,840),
15.4 s for the prune call (graph tracing included).  Magnitude pruning without any healing is destructive: loss on a
short English sentence 1.85 -> 11.9 (MLP-only at the same size: 11.8).

The ratio is found by bisection on an exact closed-form replica of TP's channel/head counting (no trial pruning),
then the real model is pruned once; the achieved count is checked against the prediction.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import torch
from torch import nn

TP_VERSION = "1.6.1"


def _import_tp():
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "This baseline needs Torch-Pruning: `pip install --no-deps torch-pruning==1.6.1` "
            "(pure Python; requires only torch and numpy)."
        ) from e
    return tp


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embedding / lm_head counted once)."""
    return sum(p.numel() for p in model.parameters())


def _layers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(self_attn, mlp) of every decoder layer."""
    out = []
    for name, m in model.named_modules():
        if hasattr(m, "self_attn") and hasattr(m, "mlp"):
            attn, mlp = m.self_attn, m.mlp
            for a in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not isinstance(getattr(attn, a, None), nn.Linear):
                    raise TypeError(
                        f"{name}.self_attn has no nn.Linear {a}; only separate q/k/v/o projections are supported"
                    )
            for a in ("gate_proj", "up_proj", "down_proj"):
                if not isinstance(getattr(mlp, a, None), nn.Linear):
                    raise TypeError(f"{name}.mlp has no nn.Linear {a}; only gated (Llama-style) MLPs are supported")
            out.append((attn, mlp))
    if not out:
        raise TypeError("no decoder layers with .self_attn and .mlp found")
    return out


def _head_dim(model: nn.Module, attn: nn.Module) -> int:
    hd = getattr(attn, "head_dim", None) or getattr(model.config, "head_dim", None)
    if hd is None:
        hd = model.config.hidden_size // model.config.num_attention_heads
    return int(hd)


def _layer_shapes(model: nn.Module) -> list[dict[str, int]]:
    shapes = []
    for attn, mlp in _layers(model):
        hd = _head_dim(model, attn)
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        H, KV = q.out_features // hd, k.out_features // hd
        per_q_head = hd * (q.in_features + (q.bias is not None)) + hd * o.out_features
        per_kv_head = hd * (k.in_features + (k.bias is not None)) + hd * (v.in_features + (v.bias is not None))
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        per_channel = g.in_features + (g.bias is not None) + u.in_features + (u.bias is not None) + d.out_features
        shapes.append(
            dict(
                H=H,
                KV=KV,
                hd=hd,
                C=g.out_features,
                per_q_head=per_q_head,
                per_kv_head=per_kv_head,
                per_channel=per_channel,
            )
        )
    return shapes


def _head_ratio_cap(H: int, KV: int) -> float:
    """Largest head ratio Torch-Pruning 1.6.1 can actually apply (0.0: no head pruning possible).

    MHA: ``ceil(r*H)`` heads are removed; keep >= 1.  GQA: ``ceil(ceil(r*H)/KV)`` query heads per KV group are
    removed, and the result must keep >= 2 query heads per KV group: if the query-head count would drop to the KV
    count, TP 1.6.1 (after decrementing its head counter) no longer recognises the group as GQA, puts the k/v rows
    into the pruning group and then silently skips the whole group in ``check_pruning_group`` -- i.e. no head is
    pruned at all.  The -0.5 keeps ``ceil`` on the safe side of floating-point rounding.
    """
    if KV == H:
        return max(H - 1.5, 0.0) / H
    return max(H - 2 * KV - 0.5, 0.0) / H


def _predict_layer(s: dict[str, int], r: float, hr: float, round_to: int | None) -> tuple[int, int, int]:
    """Replicates MetaPruner._prune (local pruning, 1 step): (q heads removed, kv heads removed, channels removed)."""
    C = s["C"]
    n_ch = C - int(C * (1 - r))
    if n_ch > 0 and round_to:
        kept = C - n_ch
        kept -= kept % round_to
        n_ch = max(C - kept, 0)
    n_ch = max(n_ch, 0)
    H, KV, hd = s["H"], s["KV"], s["hd"]
    hq = hkv = 0
    # the attention scope is only entered when its (unused, head_dim-long) channel count is > 0
    if hr > 0 and (hd - int(hd * (1 - r))) > 0:
        n = math.ceil(hr * H)
        if KV == H:
            hq = hkv = n
        else:
            hq = math.ceil(n / KV) * KV
    return hq, hkv, n_ch


def _head_ratio(r: float, shapes: list[dict[str, int]], prune_heads: bool, head_ratio: float | None) -> float:
    """The ``head_pruning_ratio`` passed to TP: ``r`` itself (as in TP's LLM example) or a fixed value, capped."""
    if not prune_heads:
        return 0.0
    hr = r if head_ratio is None else float(head_ratio)
    return max(0.0, min(hr, min(_head_ratio_cap(s["H"], s["KV"]) for s in shapes)))


def _predict_params(
    total: int,
    shapes: list[dict[str, int]],
    r: float,
    prune_heads: bool,
    round_to: int | None,
    head_ratio: float | None = None,
) -> int:
    removed = 0
    hr = _head_ratio(r, shapes, prune_heads, head_ratio)
    for s in shapes:
        hq, hkv, n_ch = _predict_layer(s, r, hr, round_to)
        removed += hq * s["per_q_head"] + hkv * s["per_kv_head"] + n_ch * s["per_channel"]
    return total - removed


def find_ratio(
    model: nn.Module,
    target_params: int,
    *,
    prune_heads: bool = True,
    head_ratio: float | None = None,
    round_to: int | None = None,
) -> tuple[float, int]:
    """Ratio ``r`` whose predicted parameter count is closest to ``target_params`` (and that count)."""
    total, shapes = count_params(model), _layer_shapes(model)
    f = lambda r: _predict_params(total, shapes, r, prune_heads, round_to, head_ratio)  # noqa: E731  (non-increasing)
    r_max = 1.0 - 1.0 / max(s["C"] for s in shapes)  # keep >= 1 MLP channel
    if target_params >= total:
        return 0.0, total
    if f(r_max) > target_params:
        raise ValueError(f"target {target_params:,} unreachable: width pruning bottoms out at {f(r_max):,} params")
    lo, hi = 0.0, r_max  # invariant: f(lo) > target >= f(hi)
    for _ in range(64):
        mid = 0.5 * (lo + hi)
        if f(mid) > target_params:
            lo = mid
        else:
            hi = mid
    # the two step values that bracket the target; pick the closer (ties -> not above target)
    return (lo, f(lo)) if f(lo) - target_params < target_params - f(hi) else (hi, f(hi))


def _fix_hf_attributes(model: nn.Module) -> dict[str, list[int]]:
    num_heads, num_kv, inter = [], [], []
    for attn, mlp in _layers(model):
        hd = _head_dim(model, attn)
        h, kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        if attn.q_proj.out_features % hd or attn.k_proj.out_features % hd or h % kv:
            raise RuntimeError(
                f"pruned attention is inconsistent: q={attn.q_proj.out_features}, "
                f"k={attn.k_proj.out_features}, head_dim={hd}"
            )
        attn.head_dim = hd
        attn.num_key_value_groups = h // kv
        for attr, val in (("num_heads", h), ("num_attention_heads", h), ("num_key_value_heads", kv)):
            if hasattr(attn, attr):  # transformers < 4.48 kept these on the module
                setattr(attn, attr, val)
        if hasattr(attn, "hidden_size"):
            attn.hidden_size = attn.q_proj.in_features
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = mlp.gate_proj.out_features
        num_heads.append(h)
        num_kv.append(kv)
        inter.append(mlp.gate_proj.out_features)
    cfg = model.config
    if len(set(num_heads)) == 1 and len(set(num_kv)) == 1 and len(set(inter)) == 1:
        # set head_dim first so that it is not re-derived from hidden_size / num_attention_heads
        cfg.head_dim = _head_dim(model, _layers(model)[0][0])
        cfg.num_attention_heads = num_heads[0]
        cfg.num_key_value_heads = num_kv[0]
        cfg.intermediate_size = inter[0]
    else:  # cannot happen with uniform local pruning, but do not leave a silently wrong config
        warnings.warn(
            "non-uniform per-layer shapes after pruning; config holds the maxima and is NOT "
            "sufficient to rebuild the model (use the returned per-layer lists)"
        )
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = (
            max(num_heads),
            max(num_kv),
            max(inter),
        )
    return {"num_heads": num_heads, "num_kv_heads": num_kv, "intermediate_size": inter}


def prune_to_params(
    model: nn.Module,
    example_input_ids: torch.Tensor | None,
    target_params: int,
    *,
    prune_heads: bool = True,
    head_ratio: float | None = None,
    round_to: int | None = None,
) -> dict[str, Any]:
    """Prune ``model`` IN PLACE with Torch-Pruning (group L2 magnitude) to ~``target_params`` parameters.

    Hidden size is kept; only attention query heads (GQA: evenly per KV group, KV heads kept) and MLP channels
    are removed, all layers with the same ratio ``r``.  By default ``head_pruning_ratio = pruning_ratio = r`` as in
    TP's LLM example; pass ``head_ratio`` to fix the head ratio and let ``r`` (MLP channels) alone match the target.
    The head ratio is capped to what TP 1.6.1 can apply (see ``_head_ratio_cap``).  ``prune_heads=False``: MLP
    channels only.  ``round_to`` is TP's channel rounding (the TP example uses 4; default None for the closest
    parameter match).  ``example_input_ids`` (1 x T token ids, only the first row / 16 tokens are used) serves
    only to trace the graph; magnitude importance needs no calibration data.

    Returns ``{"ratio", "head_ratio", "params", "predicted_params", "target_params", "num_heads",
    "num_kv_heads", "intermediate_size", "seconds", "note", ...}``.
    """
    tp = _import_tp()
    t0 = time.perf_counter()
    if example_input_ids is None:
        example_input_ids = torch.arange(8).unsqueeze(0)
    device = next(model.parameters()).device
    example_input_ids = example_input_ids[:1, :16].to(device)

    params_before = count_params(model)
    shapes = _layer_shapes(model)
    ratio, predicted = find_ratio(
        model, target_params, prune_heads=prune_heads, head_ratio=head_ratio, round_to=round_to
    )
    requested_head_ratio = head_ratio
    head_ratio = _head_ratio(ratio, shapes, prune_heads, requested_head_ratio) if ratio > 0 else 0.0

    if any(s["H"] == 2 * s["KV"] for s in shapes):
        # observed with 1.6.1 for (H, KV) = (2,1), (4,2), (6,3), (8,4), (10,5): never terminates
        raise NotImplementedError(
            "Torch-Pruning 1.6.1 hangs (infinite loop in DependencyGraph.get_pruning_group) on GQA attention with "
            "exactly 2 query heads per KV head (repeat_kv with n_rep=2); this layout is not supported"
        )
    notes = []
    gqa = any(s["KV"] != s["H"] for s in shapes)
    if prune_heads and gqa:
        notes.append(
            "GQA: Torch-Pruning keeps all KV heads and removes query heads evenly per KV group "
            "(reachable query-head counts: multiples of num_kv_heads, >= 2 per KV group)"
        )
    if prune_heads and all(_head_ratio_cap(s["H"], s["KV"]) == 0.0 for s in shapes):
        notes.append("no head pruning possible with Torch-Pruning 1.6.1 for this head layout -> MLP channels only")
    if not prune_heads:
        notes.append("MLP channels only (prune_heads=False)")

    if ratio > 0:
        attn_layers = [a for a, _ in _layers(model)]
        num_heads = {}
        for attn in attn_layers:
            hd = _head_dim(model, attn)
            num_heads[attn.q_proj] = attn.q_proj.out_features // hd
            num_heads[attn.k_proj] = attn.k_proj.out_features // hd
            num_heads[attn.v_proj] = attn.v_proj.out_features // hd
        embed = model.get_input_embeddings()
        ignored = [embed]
        lm_head = model.get_output_embeddings()
        if lm_head is not None:
            ignored.append(lm_head)
        # RMSNorm weights are "unwrapped" parameters for TP; declare their prunable dim to silence the warning
        # (they are never pruned since the hidden size is kept).  1.6.1 wants a list of (param, dim) pairs
        # although its docstring says dict.
        unwrapped = [
            (m.weight, 0)
            for m in model.modules()
            if type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), nn.Parameter)
        ]

        old_attn = getattr(model.config, "_attn_implementation", None)
        was_training = model.training
        req = {p: p.requires_grad for p in model.parameters()}
        try:
            if old_attn != "eager":
                model.set_attn_implementation("eager")  # SDPA(enable_gqa) breaks DepGraph's GQA coupling
            model.eval()
            for p in model.parameters():
                p.requires_grad_(True)  # tracing follows grad_fn
            with warnings.catch_warnings(), torch.enable_grad():
                warnings.simplefilter("ignore", UserWarning)
                pruner = tp.pruner.MetaPruner(
                    model,
                    example_inputs=example_input_ids,
                    forward_fn=lambda m, x: m(input_ids=x, use_cache=False).logits,
                    importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
                    global_pruning=False,
                    pruning_ratio=ratio,
                    ignored_layers=ignored,
                    num_heads=num_heads,
                    prune_num_heads=prune_heads,
                    prune_head_dims=False,
                    head_pruning_ratio=head_ratio,
                    round_to=round_to,
                    unwrapped_parameters=unwrapped,
                )
                for group in pruner.step(interactive=True):
                    group.prune()
            del pruner
        finally:
            for p, r in req.items():
                p.requires_grad_(r)
            if old_attn is not None and old_attn != "eager":
                model.set_attn_implementation(old_attn)
            model.train(was_training)

    shape_info = _fix_hf_attributes(model)
    if model.get_input_embeddings().weight.shape[1] != model.config.hidden_size:
        raise RuntimeError("hidden size changed; Torch-Pruning pruned the residual stream")
    params = count_params(model)
    if params != predicted:
        notes.append(f"achieved {params:,} params != predicted {predicted:,} (TP semantics differ from the replica)")
    try:
        from importlib.metadata import version

        tp_version = version("torch-pruning")
    except Exception:  # pragma: no cover
        tp_version = getattr(tp, "__version__", "unknown")
    return {
        "method": "torch-pruning MetaPruner + GroupMagnitudeImportance(p=2), local, heads+MLP, hidden kept",
        "torch_pruning_version": tp_version,
        "ratio": ratio,
        "head_ratio": head_ratio,
        "round_to": round_to,
        "target_params": int(target_params),
        "params_before": params_before,
        "predicted_params": predicted,
        "params": params,
        **shape_info,
        "seconds": time.perf_counter() - t0,
        "note": "; ".join(notes),
    }


__all__ = ["TP_VERSION", "count_params", "find_ratio", "prune_to_params"]
