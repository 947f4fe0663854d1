"""Storage honesty: encoded sizes from the actual zeros, N:M detection, and 2:4 conversion (CUDA only)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import LlamaForCausalLM

from lit_prune.sparse import (
    attach_masks,
    compressed_size,
    is_n_m_sparse,
    prunable_linears,
    tensor_sizes,
    to_semi_structured,
)
from lit_prune.sparse.storage import _semi_structured_class, _semi_structured_problem


def two_four(out: int, inp: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """A 2:4 weight: inputs 1 and 3 of every group of 4 are zero."""
    weight = torch.arange(1, out * inp + 1, dtype=torch.float32).reshape(out, inp).to(dtype)
    weight[:, 1::2] = 0
    return weight


def test_tensor_sizes_on_a_known_tensor() -> None:
    weight = two_four(64, 128)  # 8192 weights, 4096 nonzero, fp16
    sizes = tensor_sizes(weight)
    assert sizes == {
        "numel": 8192,
        "nnz": 4096,
        "dense_bytes": 16384,
        "bitmask_bytes": 1024 + 8192,  # 1 bit per weight + 2 bytes per nonzero
        "csr_bytes": 4096 * (2 + 2) + 65 * 4,  # fp16 value + int16 column per nonzero, int32 row pointers
        "semi_structured_bytes": 8192 + 1024,  # half the values + 2 bits per kept value: 56.25% of dense
    }
    wide = torch.zeros(2, 40000)
    wide[0, 0] = 1.0
    assert tensor_sizes(wide)["csr_bytes"] == 1 * (4 + 4) + 3 * 4  # int32 columns past 32768 inputs
    assert tensor_sizes(torch.ones(4, 8))["semi_structured_bytes"] is None
    with pytest.raises(ValueError, match=r"`weight` must be 2-D \(out, in\), got shape \(3,\)"):
        tensor_sizes(torch.ones(3))


def test_compressed_size_sums_the_prunable_weights() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    linears = prunable_linears(model)
    numel = sum(lin.weight.numel() for lin in linears.values())
    dense = compressed_size(model)
    assert dense["numel"] == dense["nnz"] == numel and dense["dense_bytes"] == 4 * numel
    assert dense["bitmask_bytes"] > dense["dense_bytes"] and dense["semi_structured_bytes"] is None
    attach_masks(model, {name: two_four(*lin.weight.shape) != 0 for name, lin in linears.items()})
    sparse = compressed_size(model)
    assert sparse["nnz"] == numel // 2
    assert sparse["semi_structured_bytes"] == numel // 2 * 4 + numel // 8
    assert sparse["bitmask_bytes"] < sparse["dense_bytes"] == dense["dense_bytes"]


def test_n_m_detection() -> None:
    assert is_n_m_sparse(two_four(2, 8))
    assert not is_n_m_sparse(torch.ones(2, 8))
    assert not is_n_m_sparse(two_four(2, 8)[:, :6])  # inputs not a multiple of 4
    assert is_n_m_sparse(torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]), n=1, m=2) is False
    assert is_n_m_sparse(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), n=1, m=2)


def test_semi_structured_checks_before_converting() -> None:
    backend = _semi_structured_class()
    assert _semi_structured_problem(two_four(64, 128), backend) is None
    assert "not 2:4 sparse" in _semi_structured_problem(torch.ones(64, 128, dtype=torch.float16), backend)
    assert "is not a multiple of" in _semi_structured_problem(two_four(10, 128), backend)
    assert "dtype torch.float64 is not one of" in _semi_structured_problem(two_four(64, 128, torch.float64), backend)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_to_semi_structured_on_cpu_raises() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    with pytest.raises(
        RuntimeError, match="to_semi_structured needs the model on a CUDA device.*weights on \\['cpu'\\]"
    ):
        to_semi_structured(model)
    with pytest.raises(RuntimeError, match="Only CUDA tensors are currently supported"):  # torch's own limitation
        torch.sparse.to_sparse_semi_structured(two_four(64, 128))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured kernels need CUDA")
def test_to_semi_structured_on_cuda() -> None:
    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4)
    model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    linears = prunable_linears(model)
    attach_masks(model, {name: two_four(*lin.weight.shape) != 0 for name, lin in linears.items()})
    ids = torch.randint(4, 256, (2, 16), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits
        assert to_semi_structured(model) == list(linears)
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
