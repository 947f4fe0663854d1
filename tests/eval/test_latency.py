"""latency(): shapes of the result, argument checks, and decoding after a block was removed."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from lit_prune.eval import LatencyResult, latency

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
    prefills = [i for i, kw in enumerate(calls) if kw.get("past_key_values") is None]
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


@pytest.mark.slow
def test_latency_real_model() -> None:
    from lit_prune.loading import load_model
    from lit_prune.presets import SMOLLM2

    model = load_model(SMOLLM2)
    res = latency(model, prompt_len=32, batch_sizes=(1, 2), new_tokens=4, warmup=1, repeats=1)
    _check_result(res, (1, 2))
