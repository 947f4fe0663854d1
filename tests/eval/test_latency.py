"""latency(): shapes of the result, argument checks, and decoding after a block was removed."""

from __future__ import annotations

import importlib
import logging
import math
import warnings
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from lit_prune.eval import LatencyResult, latency
from lit_prune.eval.latency import LatencyComparison, Ratio, compare_latency

FAST = dict(prompt_len=16, new_tokens=4, repeats=2)


def _check_result(res: LatencyResult, batch_sizes: tuple[int, ...]) -> None:
    assert list(res.prefill_ms) == list(batch_sizes)
    numbers = [*res.prefill_ms.values(), res.decode_tokens_per_s, res.decode_ms_per_token]
    assert all(math.isfinite(x) and x > 0 for x in numbers)
    assert res.decode_tokens_per_s == pytest.approx(1e3 / res.decode_ms_per_token)


def test_latency_tiny_model(tiny_model: LlamaForCausalLM) -> None:
    tiny_model.train()
    res = latency(tiny_model, batch_sizes=(1, 3), **FAST)
    _check_result(res, (1, 3))
    assert (res.prompt_len, res.new_tokens, res.repeats) == (16, 4, 2)
    assert (res.device, res.dtype, res.threads) == ("cpu", "float32", torch.get_num_threads())
    assert tiny_model.training
    assert set(res.metrics()) == {
        "latency/prefill_ms_b1",
        "latency/prefill_ms_b3",
        "latency/decode_tokens_per_s",
        "latency/decode_ms_per_token",
    }
    assert res.as_dict()["prefill_ms"] == res.prefill_ms
    assert "tok/s" in res.summary()


def test_prefill_keeps_only_last_logits(tiny_model: LlamaForCausalLM) -> None:
    """Prefill forwards pass `logits_to_keep=1` (as `generate` does), so they never build (B, T, V) logits."""
    calls: list[dict[str, Any]] = []
    logit_lens: list[int] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(dict(kwargs))

    def record_out(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        logit_lens.append(out.logits.size(1))

    handles = [
        tiny_model.register_forward_pre_hook(record, with_kwargs=True),
        tiny_model.register_forward_hook(record_out, with_kwargs=True),
    ]
    try:
        latency(tiny_model, batch_sizes=(1, 2), warmup=0, prompt_len=8, new_tokens=2, repeats=1)
    finally:
        for handle in handles:
            handle.remove()
    prefills = [i for i, kw in enumerate(calls) if kw["input_ids"].size(1) > 1]
    assert len(prefills) == 3  # batch 1, batch 2, then the decode prompt
    assert [calls[i]["use_cache"] for i in prefills] == [False, False, True]
    assert all(calls[i]["logits_to_keep"] == 1 for i in prefills)
    assert all(logit_lens[i] == 1 for i in prefills)
    assert len(calls) == 3 + 2  # plus one forward per decoded token


def test_latency_after_removing_a_block(tiny_model: LlamaForCausalLM) -> None:
    del tiny_model.model.layers[1]
    tiny_model.config.num_hidden_layers = 3
    if getattr(tiny_model.config, "layer_types", None) is not None:
        tiny_model.config.layer_types = tiny_model.config.layer_types[:3]
    for i, layer in enumerate(tiny_model.model.layers):
        layer.self_attn.layer_idx = i
    res = latency(tiny_model, batch_sizes=(2,), warmup=0, **FAST)
    _check_result(res, (2,))


def test_latency_misconfiguration(tiny_model: LlamaForCausalLM) -> None:
    cases = [
        (dict(prompt_len=0), "`prompt_len` must be an int >= 1, got 0"),
        (dict(new_tokens=-1), "`new_tokens` must be an int >= 1, got -1"),
        (dict(repeats=1.5), "`repeats` must be an int >= 1, got 1.5"),
        (dict(warmup=-1), "`warmup` must be an int >= 0, got -1"),
        (dict(batch_sizes=()), r"`batch_sizes` must be a non-empty sequence.*got \(\)"),
        (dict(batch_sizes=8), "`batch_sizes` must be a non-empty sequence.*got 8"),
        (dict(batch_sizes=(1, 0)), "`batch_sizes` must be an int >= 1, got 0"),
        (dict(seed=-3), "`seed` must be an int >= 0, got -3"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            latency(tiny_model, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`config.vocab_size`, got Linear"):
        latency(torch.nn.Linear(2, 2))


def test_latency_uses_the_current_cache_api_without_deprecation_warnings(
    tiny_model: LlamaForCausalLM, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers 5.x deprecates `past_key_values` (removed in 5.40): latency() must not go through it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with caplog.at_level(logging.WARNING, logger="transformers"):
            latency(tiny_model, batch_sizes=(1,), warmup=1, prompt_len=8, new_tokens=3, repeats=1)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()]


def test_decode_extends_one_cache_token_by_token(tiny_model: LlamaForCausalLM) -> None:
    """Every decode forward sees the cache the prompt filled, one token longer each time (no re-prefill)."""
    seen: list[tuple[int, int]] = []

    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            seen.append((kwargs["input_ids"].size(1), cache.get_seq_length()))

    handle = tiny_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        latency(tiny_model, batch_sizes=(1,), warmup=0, prompt_len=8, new_tokens=3, repeats=1)
    finally:
        handle.remove()
    assert seen == [(8, 0), (1, 8), (1, 9), (1, 10)]


def test_compare_latency_alternates_and_reports_the_spread(tiny_model: LlamaForCausalLM, monkeypatch) -> None:
    lat = importlib.import_module("lit_prune.eval.latency")  # the package re-exports a function of that name
    other = LlamaForCausalLM(tiny_model.config).eval()
    order: list[str] = []
    real = lat.latency

    def timed(model: torch.nn.Module, **kwargs: Any) -> LatencyResult:
        order.append("model" if model is tiny_model else "reference")
        return real(model, **kwargs)

    monkeypatch.setattr(lat, "latency", timed)
    cmp = compare_latency(tiny_model, other, rounds=3, batch_sizes=(1, 2), warmup=0, **FAST)
    assert isinstance(cmp, LatencyComparison) and cmp.rounds == 3
    assert order == ["reference", "model", "model", "reference", "reference", "model"]  # the order flips
    ratios = [m.prefill_ms[2] / r.prefill_ms[2] for m, r in zip(cmp.model, cmp.reference)]
    ratio = cmp.prefill_ratio(2)
    assert (ratio.low, ratio.high, ratio.rounds) == (min(ratios), max(ratios), 3)
    assert ratio.low <= ratio.median <= ratio.high
    assert cmp.decode_ratio().rounds == 3
    median = cmp.median_model()
    assert median.prefill_ms[1] == sorted(m.prefill_ms[1] for m in cmp.model)[1]
    assert "over 3 alternations" in str(ratio) and "prefill b2" in cmp.summary()
    with pytest.raises(ValueError, match="`rounds` must be an int >= 1, got 0"):
        compare_latency(tiny_model, other, rounds=0)


def test_ratio_text() -> None:
    assert str(Ratio.of([0.7, 0.78, 0.74])) == "0.74x (range 0.70-0.78 over 3 alternations)"


@pytest.mark.slow
def test_latency_real_model() -> None:
    from lit_prune.loading import load_model
    from lit_prune.presets import SMOLLM2

    model = load_model(SMOLLM2)
    res = latency(model, prompt_len=32, batch_sizes=(1, 2), new_tokens=4, warmup=1, repeats=1)
    _check_result(res, (1, 2))
