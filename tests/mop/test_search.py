import copy
import math

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from lit_prune import save_pretrained
from lit_prune.arch import adapter_for
from lit_prune.eval import perplexity
from lit_prune.mop import MoPSearch, register_width_masks, skipping_block
from lit_prune.mop.search import DEPTH, WIDTH
from lit_prune.plan import PruningPlan
from lit_prune.stats import Hooks
from lit_prune.surgery import apply_plan, block_shapes, loads_without_lit_prune


def _model(layers: int = 6, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=layers, intermediate_size=192)).eval()


def _batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, 256, (2, 16), generator=g)} for _ in range(n)]


def _granularity(model: LlamaForCausalLM) -> int:
    """One neuron in every block: the step of a uniform width allocation."""
    ad = adapter_for(model)
    return ad.neuron_params(ad.mlps(model)[0]) * ad.num_blocks(model)


@pytest.mark.parametrize(("favoured", "other"), [(DEPTH, WIDTH), (WIDTH, DEPTH)])
def test_a_proxy_that_favours_one_branch_gives_a_one_branch_path(favoured, other):
    model = _model()
    search = MoPSearch(model, _batches(), 0.35, proxy=lambda branch, m: 0.0 if branch == favoured else 1.0)
    path = "".join(s.branch for s in search.run())
    if favoured == WIDTH:
        assert set(path) == {WIDTH}
    else:  # only a last, partial step (less than a block left) may be width
        assert set(path[:-1]) == {DEPTH} and (path[-1] == DEPTH or search.trajectory[-1].params_before
                                              - search.trajectory[-1].params_after < max(adapter_for(model)
                                                                                         .block_params(model)))
    assert search.path == path


@pytest.mark.parametrize("target", [0.15, 0.3, 0.45])
def test_target_is_reached_within_one_granularity(target):
    model = _model()
    total = adapter_for(model).total_params(model)
    search = MoPSearch(model, _batches(), target, proxy="ppl")
    search.run()
    removed = total - adapter_for(model).total_params(model)
    assert abs(removed - round(target * total)) <= _granularity(model)
    assert search.trajectory[-1].params_after == adapter_for(model).total_params(model)
    assert model(_batches()[0]["input_ids"]).logits.isfinite().all()


def test_candidates_without_copies_equal_real_surgery():
    model = _model()
    batches = _batches()
    ids = torch.cat([b["input_ids"] for b in batches])
    search = MoPSearch(model, batches, 0.3, proxy="ppl")
    scores = search._fresh_scores()
    depth_plan = search._depth_plan(scores)
    width_plan = search._width_plan(scores, depth_plan)
    assert depth_plan is not None and width_plan is not None
    for branch, plan in ((DEPTH, depth_plan), (WIDTH, width_plan)):
        value, _ = search._evaluate(branch, plan, measure=True)
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        assert value == pytest.approx(perplexity(pruned, ids, progress=False), rel=1e-5)
    # the model itself was never changed by the evaluations
    assert adapter_for(model).num_blocks(model) == 6 and block_shapes(model)[0].intermediate_size == 192


def test_skip_and_masks_undo_themselves():
    model = _model()
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        with skipping_block(model, 2):
            assert len(model.model.layers) == 5
        with Hooks() as hooks:
            register_width_masks(model, {0: [0, 1]}, {1: [0, 5]}, hooks)
            masked = model(ids).logits
        assert not torch.equal(masked, before)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert len(model.model.layers) == 6


def test_statistics_carried_to_the_next_step_equal_fresh_ones():
    for decisions in ("G", "L"):
        model = _model()
        search = MoPSearch(model, _batches(), 0.3, proxy="ppl", decisions=decisions + "G" * 10)
        search.step()
        carried = search._scores
        assert carried is not None
        fresh = search._fresh_scores()
        assert carried.depth is not None and fresh.depth is not None
        torch.testing.assert_close(carried.depth, fresh.depth, rtol=1e-4, atol=1e-6)
        for a, b in zip((*carried.width.heads, *carried.width.neurons), (*fresh.width.heads, *fresh.width.neurons)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_decision_string_replays_a_path():
    first = _model()
    search = MoPSearch(first, _batches(), 0.3, proxy="ppl")
    search.run()
    second = _model()
    replay = MoPSearch(second, _batches(), 0.3, proxy="kl", decisions=search.path)
    replay.run()
    assert replay.path == search.path
    assert block_shapes(second) == block_shapes(first)
    assert all(math.isnan(s.proxy_depth) and math.isnan(s.proxy_width) for s in replay.trajectory)


@pytest.mark.parametrize("proxy", ["kl", "cosine"])
def test_reference_proxies_are_zero_for_an_unchanged_model_and_positive_otherwise(proxy):
    model = _model()
    search = MoPSearch(model, _batches(), 0.3, proxy=proxy)
    scores = search._fresh_scores()
    same, _ = search._evaluate(WIDTH, PruningPlan(num_layers=6), measure=True)
    # kl: the dense log-probs are stored in float16 (rounding up to ~2e-3 at ~-5.5), so an unchanged model scores
    # Σ p·ε ≠ 0: ~4e-6 over these tokens (1e-5 left a margin of 2.4); 5e-5 stays under the 1e-4 a pruned model exceeds
    assert same == pytest.approx(0.0, abs=5e-5)
    depth_plan = search._depth_plan(scores)
    assert depth_plan is not None
    value, _ = search._evaluate(DEPTH, depth_plan, measure=True)
    assert value > 1e-4


def test_random_proxy_is_seeded():
    paths = []
    for seed in (0, 0, 1, 2, 3):
        search = MoPSearch(_model(), _batches(), 0.4, proxy="random", seed=seed)
        search.run()
        paths.append(search.path)
        assert all(math.isnan(s.proxy_depth) and math.isnan(s.proxy_width) for s in search.trajectory)
    assert paths[0] == paths[1]
    assert len(set(paths)) > 1  # other seeds take other paths


def test_the_result_saves_and_reloads_with_plain_transformers(tmp_path):
    model = _model()
    MoPSearch(model, _batches(), 0.3, proxy="ppl", depth_criterion="position").run()
    assert loads_without_lit_prune(model)
    folder = save_pretrained(model, tmp_path / "mop")
    again = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = _batches()[0]["input_ids"]
    torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(proxy="loss"), r"`proxy` must be one of \['ppl', 'kl', 'cosine', 'random'\]"),
        (dict(depth_criterion="kl_global"), r"`depth_criterion` must be one of"),
        (dict(gqa="kv"), r"`gqa` must be one of \['query', 'group'\]"),
        (dict(target=1.0), r"`target` must be a fraction of all parameters in \(0, 1\), got 1.0"),
        (dict(decisions="LWX"), r"`decisions` must be a string of 'L' \(depth\) and 'G' \(width\)"),
    ],
)
def test_bad_arguments(kwargs, message):
    args = dict(target=0.3)
    args.update(kwargs)
    target = args.pop("target")
    with pytest.raises(ValueError, match=message):
        MoPSearch(_model(), _batches(), target, **args)
    with pytest.raises(ValueError, match="at least one held-out calibration batch"):
        MoPSearch(_model(), [], 0.3)


@pytest.mark.parametrize("proxy", ["ppl", "random"])
def test_branching_off_a_longer_run_equals_a_direct_run(proxy):
    direct_model = _model()
    direct = MoPSearch(direct_model, _batches(), 0.2, proxy=proxy, seed=3)
    direct.run()
    longer = MoPSearch(_model(), _batches(), 0.45, proxy=proxy, seed=3)
    while longer.full_step_fits(0.2):
        longer.step()
    fork = longer.branch_off(0.2)
    fork.run()
    assert fork.path == direct.path
    assert block_shapes(fork.hf_model) == block_shapes(direct_model)
    assert adapter_for(fork.hf_model).num_blocks(fork.hf_model) == adapter_for(direct_model).num_blocks(direct_model)
    longer.run()  # the longer run goes on unaffected by its fork
    assert len(longer.path) > len(direct.path)


def test_the_search_leaves_training_mode_alone():
    model = _model().train()
    search = MoPSearch(model, _batches(), 0.3, proxy="kl")
    search.step()
    assert all(m.training for m in model.modules())


def test_skipping_a_block_is_exact_for_sliding_window_models():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    model = Qwen2ForCausalLM(cfg).eval()
    ids = _batches()[0]["input_ids"]
    with torch.no_grad(), skipping_block(model, 1):
        skipped = model(ids, use_cache=False).logits
    assert model.config.layer_types == cfg.layer_types and len(model.model.layers) == 4
    pruned = copy.deepcopy(model)
    apply_plan(pruned, PruningPlan(num_layers=4, drop_layers=[1]))
    with torch.no_grad():
        torch.testing.assert_close(skipped, pruned(ids, use_cache=False).logits, rtol=0, atol=1e-6)


def test_misuse_raises():
    model = _model()
    with pytest.raises(ValueError, match=r"`branches` must be 'LG', 'L' or 'G', got 'X'"):
        MoPSearch(model, _batches(), 0.3, branches="X")
    with pytest.raises(ValueError, match=r"Cannot skip block 6 of a model with 6 blocks"), skipping_block(model, 6):
        pass
    search = MoPSearch(model, _batches(), 0.3, decisions="G")
    search.step()
    with pytest.raises(RuntimeError, match=r"decision string 'G' ended before the target was reached"):
        search.step()
    fresh = MoPSearch(_model(), _batches(), 0.3)
    with pytest.raises(ValueError, match=r"replay its plans first"):
        fresh.resume_from([step.as_dict() for step in search.trajectory])
