"""Wall-clock prefill latency and greedy decode throughput of a causal LM on random token ids."""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lit_prune._validation import check_int
from lit_prune.arch import model_config
from lit_prune.eval._common import evaluating, synchronize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyResult:
    """What :func:`latency` measured (medians over the timed repeats).

    Args:
        prefill_ms: batch size -> median milliseconds of one forward pass over ``(batch, prompt_len)`` tokens
            (logits of the last position only, as in ``generate``).
        decode_tokens_per_s: greedy decode throughput at batch 1, ``new_tokens / median decode seconds``.
        decode_ms_per_token: median decode milliseconds divided by ``new_tokens``.
        prompt_len: prompt length in tokens.
        new_tokens: tokens decoded one at a time after the prompt.
        repeats: timed runs per measurement.
        device: device the model ran on (e.g. ``"cpu"``, ``"cuda:0"``).
        dtype: parameter dtype (e.g. ``"float32"``).
        threads: ``torch.get_num_threads()`` during the run.
    """

    prefill_ms: dict[int, float]
    decode_tokens_per_s: float
    decode_ms_per_token: float
    prompt_len: int
    new_tokens: int
    repeats: int
    device: str
    dtype: str
    threads: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (``prefill_ms`` stays a nested dict)."""
        return asdict(self)

    def metrics(self, prefix: str = "latency/") -> dict[str, float]:
        """Flat numbers for ``log_dict`` or a results table, e.g. ``latency/prefill_ms_b8``."""
        out = {f"{prefix}prefill_ms_b{b}": ms for b, ms in self.prefill_ms.items()}
        out[f"{prefix}decode_tokens_per_s"] = self.decode_tokens_per_s
        out[f"{prefix}decode_ms_per_token"] = self.decode_ms_per_token
        return out

    def summary(self) -> str:
        """One human-readable line."""
        prefill = ", ".join(f"b{b}: {ms:.1f} ms" for b, ms in self.prefill_ms.items())
        return (
            f"prefill {self.prompt_len} tok [{prefill}] | decode {self.decode_tokens_per_s:.1f} tok/s "
            f"({self.decode_ms_per_token:.2f} ms/tok, {self.new_tokens} tok) | {self.device} {self.dtype} "
            f"{self.threads} threads, median of {self.repeats}"
        )


def _median_ms(run: Callable[[], float], warmup: int, repeats: int) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones; ``run`` returns seconds."""
    for _ in range(warmup):
        run()
    return statistics.median(run() for _ in range(repeats)) * 1e3


def latency(
    model: nn.Module,
    prompt_len: int = 128,
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> LatencyResult:
    """Time prefill per batch size and greedy decode at batch 1, on seeded random prompts.

    Prefill is one ``use_cache=False`` forward over ``(batch, prompt_len)`` ids with ``logits_to_keep=1``: like
    ``generate``, it projects only the last position onto the vocabulary, so the timing is what generation pays
    for a prompt (not ``prompt_len`` full-vocabulary logit rows). Decode prefills a batch-1 prompt with the KV cache
    (also ``logits_to_keep=1``, untimed), then runs ``new_tokens`` single-token forwards that feed
    ``past_key_values`` back (a manual loop, not ``generate``: no generation config, no EOS stop); only that loop is
    timed.

    Args:
        model: a Hugging Face causal LM, or a wrapper around one.
        prompt_len: prompt length in tokens.
        batch_sizes: batch sizes to time prefill at (each once, in the given order).
        new_tokens: tokens to decode after the prompt.
        warmup: untimed runs before each measurement (``0`` allowed).
        repeats: timed runs per measurement; the median is reported.
        device: where to run; default the model's current device. A model elsewhere is moved there and back.
        seed: seed of the CPU generator that draws the prompt ids.

    Returns:
        A :class:`LatencyResult`.

    Raises:
        ValueError: naming the argument, if a count is not a positive int (``warmup`` and ``seed`` may be 0) or
            ``batch_sizes`` is not a non-empty sequence, or if the model has no ``config.vocab_size``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> res = latency(LlamaForCausalLM(cfg), prompt_len=8, batch_sizes=(1, 2), new_tokens=2, repeats=1)
        >>> sorted(res.prefill_ms), res.decode_tokens_per_s > 0
        ([1, 2], True)
    """
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        check_int(name, value)
    check_int("warmup", warmup, minimum=0)
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or len(batch_sizes) == 0:
        raise ValueError(f"`batch_sizes` must be a non-empty sequence of positive ints, got {batch_sizes!r}")
    for b in batch_sizes:
        check_int("batch_sizes", b)
    check_int("seed", seed, minimum=0)

    config: Any = model_config(model)
    if config is None or not hasattr(config, "vocab_size"):
        raise ValueError(f"`model` must be a causal LM with a `config.vocab_size`, got {type(model).__name__}")
    vocab = int(config.vocab_size)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and prompt_len + new_tokens > max_pos:
        log.warning("prompt_len + new_tokens = %d exceeds max_position_embeddings=%d", prompt_len + new_tokens, max_pos)
    generator = torch.Generator().manual_seed(seed)

    with evaluating(model, device) as (hf_model, target), torch.inference_mode():
        dtype = str(next(hf_model.parameters()).dtype).removeprefix("torch.")

        def prefill_run(ids: torch.Tensor) -> float:
            synchronize(target)
            start = time.perf_counter()
            hf_model(input_ids=ids, use_cache=False, logits_to_keep=1)
            synchronize(target)
            return time.perf_counter() - start

        prefill_ms: dict[int, float] = {}
        for b in batch_sizes:
            ids = torch.randint(0, vocab, (b, prompt_len), generator=generator).to(target)  # (B, T)
            prefill_ms[int(b)] = _median_ms(functools.partial(prefill_run, ids), warmup, repeats)

        prompt = torch.randint(0, vocab, (1, prompt_len), generator=generator).to(target)  # (1, T)

        def decode_run() -> float:
            out = hf_model(input_ids=prompt, use_cache=True, logits_to_keep=1)
            pkv = out.past_key_values
            next_tok = out.logits[:, -1:].argmax(dim=-1)  # (1, 1)
            synchronize(target)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = hf_model(input_ids=next_tok, past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                next_tok = out.logits[:, -1:].argmax(dim=-1)  # (1, 1)
            synchronize(target)
            return time.perf_counter() - start

        decode_ms = _median_ms(decode_run, warmup, repeats)

    result = LatencyResult(
        prefill_ms=prefill_ms,
        decode_tokens_per_s=new_tokens / (decode_ms / 1e3),
        decode_ms_per_token=decode_ms / new_tokens,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        repeats=repeats,
        device=str(target),
        dtype=dtype,
        threads=torch.get_num_threads(),
    )
    log.info("Latency: %s", result.summary())
    return result
