"""perplexity()/perplexity_details() against a brute-force reference, plus count_params."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_config
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lit_prune.eval import ParamCount, PerplexityResult, count_params, perplexity, perplexity_details

VOCAB = 256
PPL_REL = 1e-5
"""Relative tolerance on a perplexity computed through another batching or against the float64 reference.

``ppl = exp(mean NLL)``, so its relative error is the mean NLL's absolute error. The per-token NLLs come from a float32
log-softmax (a few ulps each; ulp(5.5) = 4.8e-7) and ``next_token_nll`` sums a batch's tokens in float32, so the mean
(~5.5) moves by ~1 ulp with the batch size (seen: 4.2e-7 between batch sizes 1, 3, 5 and against the reference;
1e-6 passed with a margin of 1.2). 1e-5 is ~20 ulps and still far below what a wrong token count or label does."""


def _windows(n: int = 5, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def _reference_ppl(model: LlamaForCausalLM, windows: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """One window at a time: log_softmax, gather the next token, mean over every scored token, exp."""
    labels = windows if labels is None else labels
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, lab in zip(windows, labels):
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)  # (T, V)
            for t in range(ids.numel() - 1):
                target = int(lab[t + 1])
                if target == -100:
                    continue
                total -= float(logp[t, target])
                count += 1
    return math.exp(total / count)


def test_perplexity_matches_reference(tiny_model: LlamaForCausalLM) -> None:
    windows = _windows()
    ref = _reference_ppl(tiny_model, windows)
    assert perplexity(tiny_model, windows, progress=False) == pytest.approx(ref, rel=PPL_REL)


def test_perplexity_invariant_to_batch_size(tiny_model: LlamaForCausalLM) -> None:
    windows = _windows()
    values = [perplexity(tiny_model, windows, batch_size=b, progress=False) for b in (1, 3, windows.size(0))]
    assert values[1] == pytest.approx(values[0], rel=PPL_REL)
    assert values[2] == pytest.approx(values[0], rel=PPL_REL)


def test_perplexity_details(tiny_model: LlamaForCausalLM) -> None:
    windows = _windows(n=4, t=10)
    res = perplexity_details(tiny_model, windows, batch_size=3, progress=False)
    assert isinstance(res, PerplexityResult)
    assert (res.tokens, res.windows, res.seq_len) == (4 * 9, 4, 10)
    assert res.ppl == pytest.approx(math.exp(res.nll), rel=1e-9)
    assert res.as_dict()["tokens"] == 36


def test_perplexity_accepts_dataloaders(tiny_model: LlamaForCausalLM) -> None:
    windows = _windows()
    expected = perplexity(tiny_model, windows, progress=False)
    of_tensors = DataLoader(windows, batch_size=2)
    of_dicts = DataLoader([{"input_ids": w} for w in windows], batch_size=2)
    assert perplexity(tiny_model, of_tensors, progress=False) == pytest.approx(expected, rel=PPL_REL)
    assert perplexity(tiny_model, of_dicts, progress=False) == pytest.approx(expected, rel=PPL_REL)
    # A plain generator (no len) works too.
    assert perplexity(tiny_model, (w[None] for w in windows), progress=False) == pytest.approx(expected, rel=PPL_REL)


def test_perplexity_skips_ignored_labels(tiny_model: LlamaForCausalLM) -> None:
    windows = _windows()
    labels = windows.clone()
    labels[:, :5] = -100  # a "prompt" that is not scored
    labels[2, 8:] = -100
    ref = _reference_ppl(tiny_model, windows, labels)
    batches = [{"input_ids": windows[i : i + 2], "labels": labels[i : i + 2]} for i in range(0, 5, 2)]
    res = perplexity_details(tiny_model, batches, progress=False)
    assert res.ppl == pytest.approx(ref, rel=PPL_REL)
    assert res.tokens == int((labels[:, 1:] != -100).sum())
    assert res.ppl != pytest.approx(perplexity(tiny_model, windows, progress=False), rel=1e-3)


def test_perplexity_attention_mask_without_labels_skips_padding(tiny_model: LlamaForCausalLM) -> None:
    windows = _windows(n=2, t=12)
    mask = torch.ones_like(windows)
    mask[1, 8:] = 0  # right padding
    res = perplexity_details(tiny_model, [{"input_ids": windows, "attention_mask": mask}], progress=False)
    assert res.tokens == 11 + 7
    labels = windows.masked_fill(mask == 0, -100)
    assert res.ppl == pytest.approx(_reference_ppl(tiny_model, windows, labels), rel=PPL_REL)


def test_right_padded_dict_batch_matches_unpadded_rows(tiny_model: LlamaForCausalLM) -> None:
    """A right-padded batch with `attention_mask` and no labels scores exactly the real tokens of each row."""
    lengths = [12, 8, 5]
    rows = [_windows(n=1, t=n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    padded = _windows(n=3, t=12, seed=99)  # padding positions hold arbitrary ids: they must not matter
    mask = torch.zeros_like(padded)
    for i, row in enumerate(rows):
        padded[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
    batched = perplexity_details(tiny_model, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    one_by_one = perplexity_details(tiny_model, [row[None] for row in rows], progress=False)
    assert batched.tokens == one_by_one.tokens == sum(n - 1 for n in lengths)
    assert batched.nll == pytest.approx(one_by_one.nll, rel=1e-5)
    assert batched.ppl == pytest.approx(one_by_one.ppl, rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size(tiny_model: LlamaForCausalLM) -> None:
    with torch.no_grad():
        tiny_model.lm_head.weight.zero_()  # every logit 0: uniform over the vocabulary
    assert perplexity(tiny_model, _windows(), batch_size=2, progress=False) == pytest.approx(VOCAB, rel=PPL_REL)


def test_perplexity_restores_training_mode(tiny_model: LlamaForCausalLM) -> None:
    tiny_model.train()
    tiny_model.model.layers[0].eval()  # mixed modes survive too
    perplexity(tiny_model, _windows(n=2), progress=False)
    assert tiny_model.training
    assert tiny_model.model.layers[1].training
    assert not tiny_model.model.layers[0].training
    tiny_model.eval()
    perplexity(tiny_model, _windows(n=2), progress=False)
    assert not tiny_model.training


def test_perplexity_accepts_a_wrapper(tiny_model: LlamaForCausalLM) -> None:
    class Wrapper(torch.nn.Module):  # a LightningModule-like holder: no `config`, a `.model`
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

    windows = _windows(n=3)
    expected = perplexity(tiny_model, windows, progress=False)
    wrapper = Wrapper(tiny_model).train()
    assert perplexity(wrapper, windows, progress=False) == pytest.approx(expected, rel=1e-6)
    assert wrapper.training
    assert tiny_model.training


def test_perplexity_misconfiguration(tiny_model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match=r"2-D integer tensor.*shape \(12,\)"):
        perplexity(tiny_model, _windows()[0], progress=False)
    with pytest.raises(ValueError, match=r"2-D integer tensor.*torch.float32"):
        perplexity(tiny_model, _windows().float(), progress=False)
    with pytest.raises(ValueError, match=r"seq_len >= 2.*\(5, 1\)"):
        perplexity(tiny_model, _windows(t=1), progress=False)
    with pytest.raises(ValueError, match=r"empty.*\(0, 12\)"):
        perplexity(tiny_model, torch.zeros(0, 12, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="empty"):
        perplexity(tiny_model, [], progress=False)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1, got 0"):
        perplexity(tiny_model, _windows(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got True"):
        perplexity(tiny_model, _windows(), batch_size=True, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="No token was scored"):
        perplexity(tiny_model, [{"input_ids": _windows(), "labels": torch.full((5, 12), -100)}], progress=False)
    with pytest.raises(ValueError, match=r"`labels` must have the shape"):
        perplexity(tiny_model, [{"input_ids": _windows(), "labels": _windows(t=5)}], progress=False)
    with pytest.raises(TypeError, match="dict with `input_ids`"):
        perplexity(tiny_model, [{"ids": _windows()}], progress=False)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        perplexity(tiny_model, [{"input_ids": [[1, 2, 3]]}], progress=False)


def _small_llama(tie: bool) -> LlamaForCausalLM:
    return LlamaForCausalLM(tiny_config(tie_word_embeddings=tie))


def test_count_params_untied(tiny_model: LlamaForCausalLM) -> None:
    counts = count_params(tiny_model)
    assert isinstance(counts, ParamCount)
    assert counts.total == sum(p.numel() for p in tiny_model.parameters())
    assert counts.embedding == tiny_model.model.embed_tokens.weight.numel() + tiny_model.lm_head.weight.numel()
    assert counts.non_embedding == counts.total - counts.embedding
    assert counts.non_embedding == sum(p.numel() for p in tiny_model.model.layers.parameters()) + 64  # + final norm


def test_count_params_tied() -> None:
    model = _small_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    counts = count_params(model)
    assert counts.embedding == VOCAB * 64
    assert counts.total == sum(p.numel() for p in model.parameters())  # parameters() yields the tied weight once
    assert counts.total == count_params(_small_llama(tie=False)).total - VOCAB * 64
    assert counts.as_dict() == {"total": counts.total, "embedding": VOCAB * 64, "non_embedding": counts.non_embedding}
