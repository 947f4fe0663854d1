"""The pass driver: one pass serves any set of statistics; hooks pause; sequential passes hold one block's inputs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_config
from torch import Tensor, nn
from transformers import LlamaForCausalLM

from lit_prune.arch import ModelAdapter
from lit_prune.criteria.scoring import score_blocks
from lit_prune.stats import (
    WIDTH_NEEDS,
    Hooks,
    collect_depth_statistics,
    collect_global_statistics,
    collect_width_statistics,
)
from lit_prune.stats.collect import StatisticsRequest, collect_statistics
from lit_prune.stats.engine import BlockInputs, run_pass, sequential_pass


def _model(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=layers)).eval()


def _batches(count: int = 3) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = [{"input_ids": torch.randint(4, 256, (2, 9), generator=g)} for _ in range(count)]
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    out[-1]["attention_mask"] = mask
    return out


class _Counting:
    """Counts the adapter's forward entry points (the only way a pass reaches the model)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decoder = self.logits = 0
        decoder, logits = ModelAdapter.forward_decoder, ModelAdapter.forward_logits

        def count_decoder(adapter: ModelAdapter, *args: Any) -> Any:
            self.decoder += 1
            return decoder(adapter, *args)

        def count_logits(adapter: ModelAdapter, *args: Any) -> Any:
            self.logits += 1
            return logits(adapter, *args)

        monkeypatch.setattr(ModelAdapter, "forward_decoder", count_decoder)
        monkeypatch.setattr(ModelAdapter, "forward_logits", count_logits)


def test_one_pass_collects_depth_width_and_candidates_exactly_as_separate_passes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, batches = _model(), _batches()
    depth = collect_depth_statistics(model, batches, {"bi", "angular", "cka_last", "cka_all"}).compute()
    width = collect_width_statistics(model, batches)
    cands = collect_global_statistics(model, batches, {"cka", "cosine", "kl"}).compute()
    counter = _Counting(monkeypatch)
    request = StatisticsRequest(
        depth=frozenset({"bi", "angular", "cka_last", "cka_all"}),
        width=frozenset(WIDTH_NEEDS),
        candidates=frozenset({"cka", "cosine", "kl"}),
    )
    both = collect_statistics(model, batches, request)
    assert counter.decoder == len(batches) and counter.logits == 0  # one forward per batch for everything
    assert both.depth is not None and both.candidates is not None and both.width is not None
    for name in ("bi_sum", "bi_count", "angular_sum", "angular_count"):
        assert torch.equal(getattr(both.depth, name), getattr(depth, name))
    for kind in ("cka_last", "cka_all"):
        for part in ("gram", "cross", "colsum", "count"):
            assert torch.equal(getattr(getattr(both.depth, kind), part), getattr(getattr(depth, kind), part))
    assert torch.equal(both.candidates.cosine_sum, cands.cosine_sum)
    assert torch.equal(both.candidates.kl_sum, cands.kl_sum)
    assert both.candidates.cka is not None and cands.cka is not None
    for part, value in cands.cka.items():
        assert torch.equal(both.candidates.cka[part], value)
    for name in request.width:
        assert all(torch.equal(a, b) for a, b in zip(getattr(both.width, name), getattr(width, name), strict=True))


def test_score_blocks_with_one_pass_and_global_criteria_forwards_each_batch_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, batches = _model(), _batches()
    separate = {
        "bi": score_blocks(model, batches, "bi", progress=False)["bi"],
        "kl_global": score_blocks(model, batches, "kl_global", progress=False)["kl_global"],
    }
    counter = _Counting(monkeypatch)
    scores = score_blocks(model, iter(batches), "consensus", consensus_of=("bi", "kl_global"), progress=False)
    assert counter.decoder == len(batches)  # an iterator is enough: it is read once
    for name, value in separate.items():
        assert torch.equal(scores[name], value)


def test_hooks_inside_paused_do_not_run_and_run_again_after() -> None:
    layer, seen = nn.Linear(2, 2), []
    with Hooks() as hooks:
        hooks.forward(layer, lambda module, args, kwargs, output: seen.append("post"))
        hooks.forward_pre(layer, lambda module, args, kwargs: seen.append("pre"))
        with hooks.paused():
            layer(torch.zeros(1, 2))
        assert seen == []
        layer(torch.zeros(1, 2))
    assert seen == ["pre", "post"]


def test_run_pass_logits_output_is_the_models_and_on_batch_sees_it() -> None:
    model, batches = _model(), _batches(2)
    got: list[Tensor] = []
    run_pass(model, batches, {}, on_batch=lambda hf, ids, mask, out: got.append(out), output="logits")
    with torch.no_grad():
        expected = [model(**b, use_cache=False).logits for b in batches]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"output": "loss"}, "`output` must be 'hidden' or 'logits'"), ({"max_batches": 0}, "max_batches")],
)
def test_run_pass_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        run_pass(_model(), _batches(1), {}, **kwargs)


def test_run_pass_without_batches_raises_and_restores_modes() -> None:
    model = _model().train()
    with pytest.raises(ValueError, match="`batches` is empty"):
        run_pass(model, [], {})
    assert model.training and all(m.training for m in model.modules())


def test_statistics_request_rejects_unknown_and_empty() -> None:
    with pytest.raises(ValueError, match="depth"):
        StatisticsRequest(depth=frozenset({"bogus"}))
    with pytest.raises(ValueError, match="asks for nothing"):
        StatisticsRequest()


@pytest.mark.parametrize("layers", [2, 6])
def test_sequential_pass_holds_one_block_of_inputs_whatever_the_depth(layers: int) -> None:
    model, batches = _model(layers), _batches()
    held: list[int] = []
    sequential_pass(
        model,
        batches,
        lambda b, block, hooks, current: None,
        lambda b, collector: None,
        inspect=lambda b, inputs: held.append(sum(item.nbytes() for item in inputs)),
    )
    one_block = sum(b["input_ids"].numel() for b in batches) * model.config.hidden_size * 4  # float32 (B, T, d)
    assert held == [one_block] * layers


def test_sequential_pass_feeds_each_block_the_outputs_of_the_blocks_as_left() -> None:
    model, batches = _model(3), _batches(2)
    with torch.no_grad():
        nn.init.zeros_(model.model.layers[0].mlp.down_proj.weight)  # what on_block(0) will do, applied up front
        reference: list[list[Tensor]] = []
        for batch in batches:
            seen: list[Tensor] = []
            handles = [
                block.register_forward_pre_hook(
                    lambda m, a, kw: seen.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
                )
                for block in model.model.layers
            ]
            model.model(**batch, use_cache=False)
            for handle in handles:
                handle.remove()
            reference.append(seen)
    torch.manual_seed(0)
    fresh = _model(3)
    inputs: dict[int, list[Tensor]] = {}

    def on_block(b: int, collector: Any) -> None:
        if b == 0:
            nn.init.zeros_(fresh.model.layers[0].mlp.down_proj.weight)

    def inspect(b: int, held: list[BlockInputs]) -> None:
        inputs[b] = [item.hidden.clone() for item in held]

    sequential_pass(fresh, batches, lambda b, block, hooks, current: None, on_block, inspect=inspect)
    for b in range(3):
        for i in range(len(batches)):
            assert torch.allclose(inputs[b][i], reference[i][b], atol=1e-5)
