"""Helpers shared by the evaluation functions: eval mode on a chosen device, and device synchronisation."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from lit_prune.arch import unwrap

log = logging.getLogger(__name__)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module).

    Args:
        model: any module.

    Returns:
        The device of ``model``'s first parameter, or ``cpu``.
    """
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: nn.Module, device: str | torch.device | None) -> Iterator[tuple[nn.Module, torch.device]]:
    """Put ``model`` in eval mode (on ``device`` if given) and restore every module's mode and the device after.

    Args:
        model: a Hugging Face model or a wrapper around one (see :func:`lit_prune.arch.unwrap`).
        device: where to run; None keeps the model's current device. A model elsewhere is moved there and back.

    Yields:
        ``(hf_model, device)``: the Hugging Face model inside a wrapper (see :func:`lit_prune.arch.unwrap`) and the
        device the inputs must go to.
    """
    original = model_device(model)
    target = torch.device(device) if device is not None else original
    modes = {module: module.training for module in model.modules()}
    moved = target != original
    if moved:
        log.info("Moving the model from %s to %s for evaluation (moved back afterwards)", original, target)
        model.to(target)
    model.eval()
    try:
        yield unwrap(model), target
    finally:
        for module, training in modes.items():
            module.training = training
        if moved:
            model.to(original)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU), so wall-clock timings are honest.

    Args:
        device: the device the timed work ran on.
    """
    if device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif hasattr(torch, "accelerator") and torch.accelerator.is_available():
        torch.accelerator.synchronize(device)
