"""The family matrix (issue 15, item 6): every supported decoder family through every method, on tiny random configs.

Each family is built at hidden 64, 4 query heads, 2 KV heads (GQA), head_dim 24 (not 64 / 4), 4 blocks, vocab 128,
float32, seeded. What a test expects is written here independently of the adapters (module paths per family, the
planted units, the exact counts), so a wrong slice map shows up as a wrong plan, a changed logit or a missed Linear.

Tolerances: removing units whose contribution is exactly zero (zeroed o_proj / down_proj columns, identity blocks)
leaves every product the same up to float32 summation order, so logits (of order 1) agree to ``ATOL = 1e-5``; a
reload builds the same tensors and runs the same kernels, so its logits are compared exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_config
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lit_prune import CausalLMModule, UnsupportedModelError, load_pretrained, save_pretrained
from lit_prune.allocation import make_depth_plan, make_width_plan
from lit_prune.allocation.sparsity import layer_counts
from lit_prune.arch import adapter_for, supported_model_types
from lit_prune.callbacks import WidthPruning
from lit_prune.criteria.depth import DEPTH_CRITERIA
from lit_prune.criteria.scoring import score_blocks, score_width
from lit_prune.mop import MoPSearch, register_width_masks
from lit_prune.plan import PruningPlan
from lit_prune.recovery import LoRASpec, attach_lora, cka_importance, merge_lora, select_blocks
from lit_prune.sparse import one_shot_stats, prunable_linears, prune_sparse, sequential_prune
from lit_prune.stats import WIDTH_NEEDS, Hooks, WidthStatistics, collect_width_statistics
from lit_prune.stats.collect import StatisticsRequest, collect_statistics
from lit_prune.surgery import apply_plan, loads_without_lit_prune, prune_heads, prune_neurons, remove_blocks
from lit_prune.surgery.reconstruct import ReconstructConfig, reconstruction_record

VOCAB = 128
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, BLOCKS = 64, 4, 2, 24, 96, 4
ATOL = 1e-5
IDENTITY = (1, 2)  # adjacent, so `angular_block` (a contiguous window of 2) can find them too
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=BLOCKS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)
LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Family:
    """One decoder family: how to build it and, written out by hand, where its projections are."""

    name: str
    build: Callable[[], PreTrainedModel]
    linears: tuple[str, ...]
    """Every Linear of a block (dotted path inside the block): what sparsity and LoRA must cover."""
    attn_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"


def _llama() -> PreTrainedModel:
    return LlamaForCausalLM(tiny_config(vocab_size=VOCAB, max_position_embeddings=64))


def _qwen2() -> PreTrainedModel:
    return Qwen2ForCausalLM(Qwen2Config(**COMMON))  # biased q/k/v


def _qwen3() -> PreTrainedModel:
    return Qwen3ForCausalLM(Qwen3Config(**COMMON))  # q_norm / k_norm over head_dim


def _gemma3() -> PreTrainedModel:
    cfg = Gemma3TextConfig(
        **{**COMMON, "tie_word_embeddings": True},  # Gemma's own default: tied LM head
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=6,  # shorter than the 16-token windows and the generated sequences
        query_pre_attn_scalar=HEAD_DIM,
    )
    return Gemma3ForCausalLM(cfg)


def _phi3() -> PreTrainedModel:
    return Phi3ForCausalLM(Phi3Config(**COMMON, sliding_window=None))  # fused qkv_proj, gate_up_proj


def _phi() -> PreTrainedModel:
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}  # 12 rotary dims (even)
    return PhiForCausalLM(PhiConfig(**COMMON, rope_parameters=rope))  # biases everywhere, fc1 -> act -> fc2


FAMILIES = {
    f.name: f
    for f in (
        Family("llama", _llama, LLAMA_LINEARS),
        Family("qwen2", _qwen2, LLAMA_LINEARS),
        Family("qwen3", _qwen3, LLAMA_LINEARS),
        Family("gemma3_text", _gemma3, LLAMA_LINEARS),
        Family("phi3", _phi3, ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")),
        Family(
            "phi",
            _phi,
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"),
            attn_out="self_attn.dense",
            mlp_out="mlp.fc2",
        ),
    )
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Run this module on one intra-op thread: the models are tiny, and on busy cores two spinning OpenMP threads
    made it 10x slower (121 s against 11 s measured with the machine's other workers running)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=list(FAMILIES), ids=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> Family:
    return FAMILIES[request.param]


def make_model(family: Family, seed: int = 0) -> PreTrainedModel:
    """The family's tiny model, seeded, float32, in eval mode."""
    torch.manual_seed(seed)
    return family.build().float().eval()


def _module(block: nn.Module, path: str) -> nn.Linear:
    module = block.get_submodule(path)
    assert isinstance(module, nn.Linear)
    return module


def plant_identity(model: PreTrainedModel, family: Family, blocks: tuple[int, ...] = IDENTITY) -> None:
    """Zero the attention and MLP output projections (weights and biases): those blocks return their input."""
    with torch.no_grad():
        for b in blocks:
            for path in (family.attn_out, family.mlp_out):
                linear = _module(model.model.layers[b], path)
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()


def plant_dead_units(model: PreTrainedModel, family: Family, heads: tuple[int, ...], neurons: list[int]) -> None:
    """Zero the o-projection columns of ``heads`` and the down-projection columns of ``neurons`` in every block."""
    with torch.no_grad():
        for block in model.model.layers:
            o = _module(block, family.attn_out)
            for h in heads:
                o.weight[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
            _module(block, family.mlp_out).weight[:, neurons] = 0


def batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 2 sequences × 16 tokens (4 sequences by default)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, VOCAB, (2, 16), generator=g)} for _ in range(n)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _ids(seed: int = 5) -> torch.Tensor:
    return torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


# --- the fixtures are what they claim --------------------------------------------------------------------------
def test_family_configs_have_the_hard_cases(family: Family) -> None:
    model = make_model(family)
    adapter = adapter_for(model)
    assert model.config.model_type == family.name
    assert adapter.head_dim(model) == HEAD_DIM != HIDDEN // HEADS
    views = adapter.attentions(model)
    assert [(v.num_heads, v.num_kv_heads) for v in views] == [(HEADS, KV_HEADS)] * BLOCKS
    assert [m.intermediate_size for m in adapter.mlps(model)] == [INTERMEDIATE] * BLOCKS
    block = model.model.layers[0]
    found = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    assert found == set(family.linears)
    assert adapter.linear_paths() == list(family.linears)  # the adapter's prunable Linears are all of them
    assert all(p.dtype == torch.float32 for p in model.parameters())
    if family.name == "qwen2":
        assert block.self_attn.q_proj.bias is not None and block.self_attn.o_proj.bias is None
    if family.name in ("qwen3", "gemma3_text"):
        assert block.self_attn.q_norm.weight.shape == (HEAD_DIM,)
    if family.name == "gemma3_text":
        assert len(set(model.config.layer_types)) == 2
    if family.name == "phi":
        assert adapter.mlp(block).gate is None and block.mlp.fc2.bias is not None


# --- depth -----------------------------------------------------------------------------------------------------
CRITERIA = [c for c in DEPTH_CRITERIA if c not in ("random", "reversed")]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_depth_criteria_remove_planted_identity_blocks(family: Family, criterion: str) -> None:
    model = make_model(family)
    plant_identity(model, family)
    ids = _ids()
    before = logits(model, ids)
    # the DepthPruning callback's functional path: score, plan, apply
    scores = score_blocks(model, batches(), criterion, n=len(IDENTITY), progress=False)
    plan = make_depth_plan(model, scores[criterion], num_remove=len(IDENTITY), method=f"depth:{criterion}")
    assert plan.drop_layers == IDENTITY, scores[criterion].tolist()
    apply_plan(model, plan)
    assert len(model.model.layers) == model.config.num_hidden_layers == BLOCKS - len(IDENTITY)
    assert plan.params_after == sum(p.numel() for p in model.parameters())
    if family.name == "gemma3_text":
        assert model.config.layer_types == ["sliding_attention", "full_attention"]  # blocks 0 and 3 keep theirs
    torch.testing.assert_close(logits(model, ids), before, atol=ATOL, rtol=0)


# --- width -----------------------------------------------------------------------------------------------------
def _dead_layout(model: PreTrainedModel, gqa: str) -> tuple[tuple[int, ...], list[int], int]:
    """Planted heads, neurons and their parameters, with the MLP share equal to the attention share.

    ``gqa="query"``: one query head of each KV group (heads 1 and 2); ``"group"``: all of KV group 1 (heads 2, 3).
    The neuron count makes the dead fraction of the MLP match that of the attention, so both allocations' per-part
    budgets (AMP's ratio p of each part) land on exactly the planted units.
    """
    adapter = adapter_for(model)
    attn, mlp = adapter.attentions(model)[0], adapter.mlps(model)[0]
    heads = (1, 2) if gqa == "query" else (2, 3)
    dead_attn = 2 * adapter.head_params(attn) if gqa == "query" else adapter.kv_group_params(attn)
    attn_params = sum(p.numel() for m in attn.module.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    n = round(dead_attn / attn_params * INTERMEDIATE)
    neurons = [i * INTERMEDIATE // n for i in range(n)]
    per_block = dead_attn + n * adapter.neuron_params(mlp)
    return heads, neurons, per_block * BLOCKS


@pytest.mark.filterwarnings("ignore:gqa='group' removes")
@pytest.mark.parametrize(
    ("gqa", "allocation"),
    [("query", "uniform"), ("query", "global"), ("group", "uniform"), ("group", "global")],
    ids=["query-uniform", "query-global", "group-uniform", "group-global"],
)
def test_amp_removes_planted_heads_and_neurons_and_keeps_logits(family: Family, gqa: str, allocation: str) -> None:
    model = make_model(family)
    heads, neurons, dead = _dead_layout(model, gqa)
    plant_dead_units(model, family, heads, neurons)
    ids = _ids()
    before = logits(model, ids)
    # the WidthPruning callback's functional path: score, allocate, apply
    scores = score_width(model, batches(), "amp")
    for block_heads, block_neurons in zip(scores.heads, scores.neurons):
        live_heads = [h for h in range(HEADS) if h not in heads]
        live = [n for n in range(INTERMEDIATE) if n not in neurons]
        assert block_heads[list(heads)].abs().max() == 0 < block_heads[live_heads].min()
        assert block_neurons[neurons].abs().max() == 0 < block_neurons[live].min()
    plan = make_width_plan(model, scores, dead, gqa=gqa, allocation=allocation)  # type: ignore[arg-type]
    kept_heads = tuple(h for h in range(HEADS) if h not in heads)
    kept_neurons = tuple(n for n in range(INTERMEDIATE) if n not in neurons)
    assert plan.keep_heads == {b: kept_heads for b in range(BLOCKS)}
    assert plan.keep_neurons == {b: kept_neurons for b in range(BLOCKS)}
    total = sum(p.numel() for p in model.parameters())
    assert plan.params_before == total and plan.params_after == total - dead
    apply_plan(model, plan)
    assert plan.params_after == sum(p.numel() for p in model.parameters())
    kv = KV_HEADS if gqa == "query" else KV_HEADS - 1
    views = adapter_for(model).attentions(model)
    assert [(v.num_heads, v.num_kv_heads) for v in views] == [(len(kept_heads), kv)] * BLOCKS
    torch.testing.assert_close(logits(model, ids), before, atol=ATOL, rtol=0)


def _unit_weights(
    block: nn.Module, family: Family
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """``(q rows, o, [gate rows, up rows] or [up rows], down)`` of a block, split as its forward splits them."""
    attn, mlp = block.self_attn, block.mlp
    if family.name == "phi3":  # Phi3Attention: query_pos = num_attention_heads * head_dim; Phi3MLP: chunk(2)
        q = attn.qkv_proj.weight[: HEADS * HEAD_DIM]
        rows = list(mlp.gate_up_proj.weight.chunk(2, dim=0))
    elif family.name == "phi":
        q, rows = attn.q_proj.weight, [mlp.fc1.weight]
    else:
        q, rows = attn.q_proj.weight, [mlp.gate_proj.weight, mlp.up_proj.weight]
    return q, _module(block, family.attn_out).weight, rows, _module(block, family.mlp_out).weight


def test_data_free_and_wanda_sp_width_criteria_read_each_units_own_weights(family: Family) -> None:
    """``magnitude`` equals a reference on the family's own split; a unit whose weights are all zero scores 0."""
    model = make_model(family)
    dead_head, dead_neurons = 1, [5, 50]
    with torch.no_grad():
        for block in model.model.layers:
            q, o, rows, down = _unit_weights(block, family)
            q[dead_head * HEAD_DIM : (dead_head + 1) * HEAD_DIM] = 0
            o[:, dead_head * HEAD_DIM : (dead_head + 1) * HEAD_DIM] = 0
            for w in rows:
                w[dead_neurons] = 0
            down[:, dead_neurons] = 0
    magnitude = score_width(model, None, "magnitude")
    for b, block in enumerate(model.model.layers):
        q, o, rows, down = _unit_weights(block, family)
        with torch.no_grad():
            heads = q.view(HEADS, HEAD_DIM, -1).pow(2).sum((1, 2)) + o.view(HIDDEN, HEADS, HEAD_DIM).pow(2).sum((0, 2))
            neurons = sum(w.pow(2).sum(1) for w in rows) + down.pow(2).sum(0)
        torch.testing.assert_close(magnitude.heads[b], heads.sqrt())
        torch.testing.assert_close(magnitude.neurons[b], neurons.sqrt())
    wanda_sp = score_width(model, batches(), "wanda_sp")
    live_heads = [h for h in range(HEADS) if h != dead_head]
    live = [n for n in range(INTERMEDIATE) if n not in dead_neurons]
    for scores in (magnitude, wanda_sp):
        for heads, neurons in zip(scores.heads, scores.neurons):
            assert heads[dead_head] == 0 < heads[live_heads].min()
            assert neurons[dead_neurons].abs().max() == 0 < neurons[live].min()


def test_phi3_slice_maps_match_how_phi3_splits_its_fused_projections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture q/k/v where Phi3Attention hands them on and the MLP's ``up * act(gate)``; compare with the maps.

    The captures are transformers' own split of ``qkv_proj`` (``query_pos = num_attention_heads · head_dim``) and of
    ``gate_up_proj`` (``chunk(2)``); checked on the dense model and after head / KV-group / neuron removal.
    """
    from transformers.models.phi3 import modeling_phi3

    model = make_model(FAMILIES["phi3"])
    model.set_attn_implementation("eager")
    adapter = adapter_for(model)
    view = adapter.attention(model.model.layers[0], HEAD_DIM)
    assert [(p.placement.offset, p.placement.count) for p in (view.q, view.k, view.v)] == [
        (0, HEADS),
        (HEADS * HEAD_DIM, KV_HEADS),
        ((HEADS + KV_HEADS) * HEAD_DIM, KV_HEADS),
    ]
    mlp = adapter.mlp(model.model.layers[0])
    assert mlp.gate is not None
    assert (mlp.gate.placement.offset, mlp.up.placement.offset) == (0, INTERMEDIATE)

    seen: dict[str, list[torch.Tensor]] = {"q": [], "k": [], "v": [], "x": [], "mlp_x": [], "act": []}
    rotary, eager = modeling_phi3.apply_rotary_pos_emb, modeling_phi3.eager_attention_forward

    def capture_rotary(q: torch.Tensor, k: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen["q"].append(q)  # (B, H, T, d): before rotary, exactly the qkv_proj rows
        seen["k"].append(k)
        return rotary(q, k, *args, **kwargs)

    def capture_eager(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a: object, **kw: object):
        seen["v"].append(v)  # (B, KV, T, d)
        return eager(module, q, k, v, *a, **kw)

    monkeypatch.setattr(modeling_phi3, "apply_rotary_pos_emb", capture_rotary)
    monkeypatch.setattr(modeling_phi3, "eager_attention_forward", capture_eager)

    def check() -> None:
        for values in seen.values():
            values.clear()
        with Hooks() as hooks:
            for block in model.model.layers:
                hooks.forward_pre(block.self_attn.qkv_proj, lambda m, a, kw: seen["x"].append(a[0]))
                hooks.forward_pre(block.mlp.gate_up_proj, lambda m, a, kw: seen["mlp_x"].append(a[0]))
                hooks.forward_pre(block.mlp.down_proj, lambda m, a, kw: seen["act"].append(a[0]))
            logits(model, _ids())
        for b, block in enumerate(model.model.layers):
            attn, mlp = adapter.attention(block, HEAD_DIM), adapter.mlp(block)
            x, weight = seen["x"][b], block.self_attn.qkv_proj.weight
            for key, proj, count in (
                ("q", attn.q, attn.num_heads),
                ("k", attn.k, attn.num_kv_heads),
                ("v", attn.v, attn.num_kv_heads),
            ):
                assert seen[key][b].shape[1] == count
                for unit in range(count):
                    expected = x @ weight[proj.indices([unit])].T  # (B, T, d)
                    torch.testing.assert_close(seen[key][b][:, unit], expected)
            assert mlp.gate is not None
            x, weight = seen["mlp_x"][b], block.mlp.gate_up_proj.weight
            gate, up = x @ weight[mlp.gate.indices()].T, x @ weight[mlp.up.indices()].T
            torch.testing.assert_close(seen["act"][b], up * block.mlp.activation_fn(gate))

    check()
    prune_heads(model, 0, [0, 3])  # one head of each KV group
    prune_heads(model, 1, [2, 3])  # KV group 1 only
    prune_neurons(model, 2, range(0, INTERMEDIATE, 3))
    assert [(a.num_heads, a.num_kv_heads) for a in adapter.attentions(model)][:2] == [(2, 2), (2, 1)]
    check()


# --- MoP -------------------------------------------------------------------------------------------------------
def test_mop_reaches_a_small_target_and_its_masks_equal_surgery(family: Family) -> None:
    model = make_model(family)
    adapter = adapter_for(model)
    ids = _ids()
    keep_heads, keep_neurons = {0: [0, 3], 2: [0, 1]}, {1: list(range(0, INTERMEDIATE, 2)), 3: list(range(40))}
    with Hooks() as hooks:  # a MoP width candidate: masked inputs instead of surgery
        register_width_masks(model, keep_heads, keep_neurons, hooks)
        masked = logits(model, ids)
    assert not torch.equal(masked, logits(model, ids))
    pruned = make_model(family)
    for b, keep in keep_heads.items():
        prune_heads(pruned, b, keep)
    for b, keep in keep_neurons.items():
        prune_neurons(pruned, b, keep)
    torch.testing.assert_close(logits(pruned, ids), masked, atol=ATOL, rtol=0)

    total = adapter.total_params(model)
    granularity = adapter.neuron_params(adapter.mlps(model)[0]) * BLOCKS  # one neuron in every block
    search = MoPSearch(model, batches(), 0.3, proxy="ppl")
    search.run()
    after = sum(p.numel() for p in model.parameters())
    assert abs((total - after) - round(0.3 * total)) <= granularity
    assert search.trajectory[-1].params_after == after
    assert logits(model, ids).isfinite().all()


# --- sparsity --------------------------------------------------------------------------------------------------
SPARSITY = {
    "wanda": dict(criterion="wanda"),
    "sparsegpt": dict(criterion="sparsegpt"),
    "wanda-2:4": dict(criterion="wanda", n_m="2:4"),
    "wanda-owl": dict(criterion="wanda", allocation="owl"),
}


@pytest.mark.parametrize("method", list(SPARSITY))
def test_sparsity_masks_are_exact_and_cover_every_linear(family: Family, method: str) -> None:
    model = make_model(family)
    expected_names = [f"model.layers.{b}.{path}" for b in range(BLOCKS) for path in family.linears]
    linears = {n: m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, nn.Linear)}
    assert sorted(linears) == sorted(expected_names)  # every Linear in the blocks, fused ones included
    result = prune_sparse(model, batches(), sparsity=0.5, **SPARSITY[method])  # type: ignore[arg-type]
    assert list(result.masks) == expected_names == list(prunable_linears(model))
    sizes = [linears[n].weight.numel() for n in expected_names]
    if method == "wanda-2:4":
        for name in expected_names:
            pruned = ~result.masks[name].view(linears[name].out_features, -1, 4)
            assert bool((pruned.sum(-1) == 2).all()), name  # exactly 2 of every 4 consecutive inputs
    per_linear = [result.block_ratios[b] for b in range(BLOCKS) for _ in family.linears]
    expected = layer_counts(per_linear, sizes, 0.5)  # per the allocation (uniform: half of each Linear)
    assert [result.counts[n] for n in expected_names] == expected
    if method != "wanda-owl":
        assert expected == [s // 2 for s in sizes]
    assert sum(result.counts.values()) == sum(sizes) // 2
    for name in expected_names:
        weight = linears[name].weight
        assert not weight[~result.masks[name]].any()
        assert int((weight == 0).sum()) == result.counts[name]  # no other exact zeros
    assert logits(model, _ids()).isfinite().all()


def test_sequential_replay_reproduces_the_model_blocks(family: Family) -> None:
    """Block-by-block calibration (the Wanda/SparseGPT protocol) on an unchanged model sees the real inputs.

    Gemma 3 passes sliding and full attention blocks different masks and rotary embeddings: the replay must too.
    """
    model = make_model(family)
    data = batches()
    one_shot = one_shot_stats(model, data, ["input_sq"])
    replayed: dict[str, torch.Tensor] = {}

    def keep(b: int, stats: dict) -> None:
        replayed.update({name: s.input_sq for name, s in stats.items()})

    sequential_prune(model, data, ["input_sq"], keep)
    assert list(replayed) == list(one_shot)
    for name, stats in one_shot.items():
        assert stats.input_sq is not None
        torch.testing.assert_close(replayed[name], stats.input_sq, rtol=1e-5, atol=1e-8, msg=name)


def test_one_pass_sums_each_sites_squares_once_and_width_sums_do_not_depend_on_the_request(family: Family) -> None:
    """Width's per-site ``Σ x²`` and the per-Linear ``input_sq`` are one sum: a pass asking both computes it once
    (from the Linears), and the width sums are bit-identical to a width-only pass, fused and non-gated MLPs too."""
    model = make_model(family)
    data = batches()
    data[-1]["attention_mask"] = torch.tensor([[1] * 16, [1] * 11 + [0] * 5])  # padding must be left out alike
    squares = ("attn_in_sq", "o_in_sq", "mlp_in_sq", "down_in_sq")
    alone = collect_width_statistics(model, data)
    calls = {"width": 0}
    original = WidthStatistics.update

    def counting(self: WidthStatistics, block: int, site: str, *args: object, **kwargs: object) -> None:
        calls["width"] += site in self.sites
        original(self, block, site, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WidthStatistics, "update", counting)
        both = collect_statistics(model, data, StatisticsRequest(width=WIDTH_NEEDS, linear={"input_sq"}))
    assert calls["width"] == 2 * BLOCKS * len(data)  # only the AMP sites (o_proj and down_proj inputs) run
    assert both.width is not None and both.linear is not None
    for name in WIDTH_NEEDS:
        for a, b in zip(getattr(both.width, name), getattr(alone, name), strict=True):
            assert torch.equal(a, b), name
    assert torch.equal(both.width.count, alone.count)
    first_mlp = next(p for p in family.linears if p.startswith("mlp."))  # gate, fused gate_up or fc1
    site_paths = dict(zip(squares, (family.linears[0], family.attn_out, first_mlp, family.mlp_out), strict=True))
    for b in range(BLOCKS):
        for need, path in site_paths.items():
            assert torch.equal(getattr(alone, need)[b], both.linear[f"model.layers.{b}.{path}"].input_sq), need
    only = collect_statistics(model, data, StatisticsRequest(width={"o_in_sq"}, linear={"input_sq"})).width
    assert only is not None and only.amp_heads is None and torch.equal(only.count, alone.count)
    assert (only.heads, only.neurons) == (alone.heads, alone.neurons)
    assert all(torch.equal(a, b) for a, b in zip(only.o_in_sq, alone.o_in_sq, strict=True))  # type: ignore[arg-type]


NEURON_TWINS = {2 * j + 1: 2 * j for j in range(12)}  # neuron 2j+1 computes what neuron 2j does
HEAD_TWINS = {1: 0, 3: 2}  # the second query head of each KV group copies the first


def plant_twins(model: PreTrainedModel, family: Family, mlp_block: int = 1, attn_block: int = 2) -> None:
    """Copy the rows that make a neuron's activation (gate/up, fused gate_up, fc1) and a head's queries (q rows of
    q_proj or of the fused qkv_proj), weights and biases, from each source unit to its twin."""
    mlp_rows = {"phi3": (("mlp.gate_up_proj", 0), ("mlp.gate_up_proj", INTERMEDIATE)), "phi": (("mlp.fc1", 0),)}
    q_path = "self_attn.qkv_proj" if family.name == "phi3" else "self_attn.q_proj"  # [q; k; v]: q rows first
    copies = [
        (model.model.layers[mlp_block], path, offset, 1, NEURON_TWINS)
        for path, offset in mlp_rows.get(family.name, (("mlp.gate_proj", 0), ("mlp.up_proj", 0)))
    ] + [(model.model.layers[attn_block], q_path, 0, HEAD_DIM, HEAD_TWINS)]
    with torch.no_grad():
        for layer, path, offset, width, twins in copies:
            linear = _module(layer, path)
            for twin, source in twins.items():
                dst = slice(offset + twin * width, offset + (twin + 1) * width)
                src = slice(offset + source * width, offset + (source + 1) * width)
                linear.weight[dst] = linear.weight[src]
                if linear.bias is not None:
                    linear.bias[dst] = linear.bias[src]


def test_lsq_reconstruction_makes_removing_twin_units_exact(family: Family) -> None:
    """Removing duplicated neurons and heads with the least-squares refit of down/o leaves the logits (fused, biased,
    non-gated MLPs); cutting them without the refit does not."""
    model = make_model(family)
    plant_twins(model, family)
    ids = _ids()
    dense = logits(model, ids)
    record = reconstruction_record(ReconstructConfig("lsq", ridge=1e-9), {}, None, None)
    plan = PruningPlan(
        num_layers=BLOCKS,
        keep_neurons={1: tuple(n for n in range(INTERMEDIATE) if n not in NEURON_TWINS)},
        keep_heads={2: tuple(h for h in range(HEADS) if h not in HEAD_TWINS)},
        heads_before=(HEADS,) * BLOCKS,
        neurons_before=(INTERMEDIATE,) * BLOCKS,
        reconstruction=record,
    )
    cut = make_model(family)
    plant_twins(cut, family)
    apply_plan(cut, plan, reconstruct=False)
    apply_plan(model, plan, calibration=batches(12))  # 384 tokens: more than any refit Linear's inputs
    assert (logits(cut, ids) - dense).abs().max() > 1e-2
    torch.testing.assert_close(logits(model, ids), dense, rtol=0, atol=1e-4)


# --- LoRA ------------------------------------------------------------------------------------------------------
def _randomise_lora(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter a nonzero ``B`` (PEFT starts it at zero), so merging has something to merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _lora_slots(model: nn.Module) -> list[str]:
    return sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lora_A"))


def test_lora_default_targets_cover_the_family_and_merge_exactly(family: Family) -> None:
    model = make_model(family)
    ids = _ids()
    base = logits(model, ids)
    wrapped = attach_lora(model, LoRASpec(r=4, alpha=8.0, dropout=0.0))
    assert _lora_slots(wrapped) == sorted(f"model.layers.{b}.{p}" for b in range(BLOCKS) for p in family.linears)
    _randomise_lora(wrapped)
    adapted = logits(wrapped, ids)
    assert (adapted - base).abs().max() > 1e-3
    merged = merge_lora(wrapped)
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), adapted, atol=ATOL, rtol=0)


def test_cka_lora_selects_the_blocks_that_change_the_representation(family: Family) -> None:
    model = make_model(family)
    plant_identity(model, family)
    importance = cka_importance(model, batches(), n_samples=4)
    assert importance[list(IDENTITY)].abs().max() < 1e-6 < importance[[0, 3]].min()
    selected = select_blocks(importance, 0.5)
    assert selected == [0, 3]
    ids = _ids()
    wrapped = attach_lora(model, LoRASpec(r=4, alpha=8.0, dropout=0.0, layers=tuple(selected)))
    assert _lora_slots(wrapped) == sorted(f"model.layers.{b}.{p}" for b in selected for p in family.linears)
    _randomise_lora(wrapped)
    adapted = logits(wrapped, ids)
    torch.testing.assert_close(logits(merge_lora(wrapped), ids), adapted, atol=ATOL, rtol=0)


# --- save, reload, generate ------------------------------------------------------------------------------------
def _prune_non_uniformly(model: PreTrainedModel) -> None:
    """Heads from block 0 (one per KV group), KV group 0 from block 2, neurons from block 3, then block 1 goes."""
    prune_heads(model, 0, [0, 2])
    prune_heads(model, 2, [2, 3])
    prune_neurons(model, 3, range(0, INTERMEDIATE, 2)[:40])
    remove_blocks(model, [1])


def test_save_and_reload_after_width_and_depth_pruning(family: Family, tmp_path) -> None:
    model = make_model(family)
    types = getattr(model.config, "layer_types", None)
    _prune_non_uniformly(model)
    views = adapter_for(model).attentions(model)
    assert [(v.num_heads, v.num_kv_heads) for v in views] == [(2, 2), (2, 1), (4, 2)]
    assert not loads_without_lit_prune(model)
    ids = _ids()
    before = logits(model, ids)
    folder = save_pretrained(model, tmp_path / family.name)
    again = load_pretrained(folder)
    assert type(again) is type(model)
    torch.testing.assert_close(logits(again, ids), before, atol=0, rtol=0)
    assert again.config.num_hidden_layers == 3
    if types is not None and family.name == "gemma3_text":
        expected = [types[0], types[2], types[3]]
        assert model.config.layer_types == again.config.layer_types == expected
        assert expected == ["sliding_attention", "sliding_attention", "full_attention"]


def test_uniform_pruning_saves_a_stock_checkpoint(family: Family, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = make_model(family)
    for b in range(BLOCKS):
        prune_heads(model, b, [0, 3])
        prune_neurons(model, b, range(0, INTERMEDIATE, 2))
    remove_blocks(model, [1])
    ids = _ids()
    before = logits(model, ids)
    folder = save_pretrained(model, tmp_path / family.name)
    assert loads_without_lit_prune(model)
    again = AutoModelForCausalLM.from_pretrained(folder)
    assert (again.config.num_attention_heads, again.config.intermediate_size) == (2, INTERMEDIATE // 2)
    torch.testing.assert_close(logits(again, ids), before, atol=0, rtol=0)


def test_phi_with_qk_layernorm_refuses_heads_but_prunes_neurons_and_blocks(tmp_path) -> None:
    """Phi's q/k LayerNorms are sized ``hidden_size // num_attention_heads`` (so head_dim must be that here)."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    fields = {k: v for k, v in COMMON.items() if k != "head_dim"}
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(**fields, rope_parameters=rope, qk_layernorm=True)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scores = score_width(model, batches(), "amp")
    plan = make_width_plan(model, scores, 0.4)
    assert plan.keep_heads
    with pytest.raises(ValueError, match="qk_layernorm=True.*prune MLP neurons or blocks only"):
        apply_plan(model, plan)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # nothing was cut
    with pytest.raises(MisconfigurationException, match="WidthPruning: .*qk_layernorm=True"):
        WidthPruning(amount=0.2).check_model(CausalLMModule(model=model))  # refused before any calibration
    with pytest.raises(ValueError, match="qk_layernorm=True.*branches='L'"):
        MoPSearch(model, batches(), 0.3)
    MoPSearch(model, batches(), 0.3, branches="L")  # depth only is fine
    prune_neurons(model, 0, range(50))
    remove_blocks(model, [2])
    ids = _ids()
    before = logits(model, ids)
    again = load_pretrained(save_pretrained(model, tmp_path / "phi-qk"))
    torch.testing.assert_close(logits(again, ids), before, atol=0, rtol=0)


def test_generate_with_kv_cache_after_pruning(family: Family) -> None:
    model = make_model(family)
    _prune_non_uniformly(model)
    prompt = torch.randint(4, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    runs = {}
    for use_cache in (True, False):
        with torch.no_grad():
            runs[use_cache] = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=10,  # past Gemma 3's sliding window of 6
                min_new_tokens=10,
                do_sample=False,
                use_cache=use_cache,
                return_dict_in_generate=True,
                output_scores=True,
                pad_token_id=3,
            )
    assert runs[True].sequences.shape == (2, 15)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for cached, full in zip(runs[True].scores, runs[False].scores):
        torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


# --- anything else ---------------------------------------------------------------------------------------------
def _gpt2() -> PreTrainedModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32))


def _neox() -> PreTrainedModel:
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
    )
    return GPTNeoXForCausalLM(cfg)


@pytest.mark.parametrize(("build", "model_type"), [(_gpt2, "gpt2"), (_neox, "gpt_neox")], ids=["gpt2", "gpt_neox"])
def test_unsupported_family_fails_at_once_naming_it_and_the_supported_ones(build, model_type: str) -> None:
    torch.manual_seed(0)
    model = build().eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    supported = supported_model_types()
    assert set(FAMILIES) <= set(supported) and model_type not in supported
    message = rf"model_type='{model_type}'.*supported: \[.*'gemma3_text'.*'phi'.*'phi3'"
    entry_points = {
        "adapter_for": lambda: adapter_for(model),
        "score_blocks": lambda: score_blocks(model, batches(), "bi", progress=False),
        "score_width": lambda: score_width(model, batches(), "amp"),
        "prune_sparse": lambda: prune_sparse(model, batches(), "wanda", 0.5),
        "MoPSearch": lambda: MoPSearch(model, batches(), 0.2),
        "attach_lora": lambda: attach_lora(model, LoRASpec()),
    }
    for name, call in entry_points.items():
        with pytest.raises(UnsupportedModelError, match=message):
            call()
        assert not calls, f"{name} ran the model before refusing it"
