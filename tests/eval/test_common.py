"""evaluating(): eval mode inside, every module's mode restored afterwards, also on an error."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from lit_prune.eval._common import evaluating, model_device, synchronize


def test_evaluating_restores_modes_after_an_error(tiny_model: LlamaForCausalLM) -> None:
    tiny_model.train()
    tiny_model.model.layers[0].eval()
    seen: list[object] = []

    def fail_inside() -> None:
        with evaluating(tiny_model, None) as (hf_model, device):
            seen.extend([hf_model, device, any(m.training for m in tiny_model.modules())])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    assert seen == [tiny_model, torch.device("cpu"), False]
    assert tiny_model.training
    assert not tiny_model.model.layers[0].training
    assert tiny_model.model.layers[1].training


def test_model_device_and_synchronize_on_cpu() -> None:
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    synchronize(torch.device("cpu"))  # a no-op, must not raise
