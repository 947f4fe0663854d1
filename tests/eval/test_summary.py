import pytest
import torch

from lit_prune.eval import evaluate_model, format_table


def test_summary_table_has_protocol_and_numbers(tiny_model):
    windows = torch.randint(4, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    lat = {"prompt_len": 8, "batch_sizes": (1, 2), "new_tokens": 2, "repeats": 1}
    dense = evaluate_model(tiny_model, "dense", windows, "corpus.txt", latency_kwargs=lat, progress=False)
    size_only = evaluate_model(tiny_model, "size only")
    table = format_table([dense, size_only])
    assert table.splitlines()[0] == "| | dense | size only |"
    assert f"| perplexity | {dense.ppl.ppl:.3f} | - |" in table
    assert "prefill latency, batch 2" in table
    assert "dense: PPL = exp(mean next-token NLL) on corpus.txt, 3 windows of 12 tokens (33 scored tokens)." in table
    assert size_only.ppl is None and size_only.latency is None
    twice = format_table([dense, dense]).splitlines()  # one protocol line per protocol, naming every model
    assert sum("PPL = exp" in line for line in twice) == 1
    assert [line for line in twice if "latency on cpu" in line][0].startswith("dense, dense: latency on cpu")
    assert dense.as_dict()["params"]["total"] == sum(p.numel() for p in tiny_model.parameters())


def test_format_table_needs_a_summary():
    with pytest.raises(ValueError, match="format_table needs at least one EvalSummary"):
        format_table([])
