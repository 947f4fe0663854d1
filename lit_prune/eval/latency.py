"""Wall-clock prefill latency and greedy decode throughput of a causal LM on random token ids."""

from __future__ import annotations

import functools
import inspect
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

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


def _cache_keyword(hf_model: nn.Module) -> str:
    """The forward keyword that takes a KV cache: ``cache`` (transformers >= 5.x) or ``past_key_values`` (older)."""
    try:
        params = inspect.signature(hf_model.forward).parameters
    except (TypeError, ValueError):  # a forward without a readable signature: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _new_cache(config: Any) -> DynamicCache:
    """An empty KV cache laid out for ``config`` (sliding-window layers included) where transformers supports it."""
    if config is not None and "config" in inspect.signature(DynamicCache.__init__).parameters:
        return DynamicCache(config=config)
    return DynamicCache()


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
    for a prompt (not ``prompt_len`` full-vocabulary logit rows). Decode prefills a batch-1 prompt into a fresh
    ``DynamicCache`` (also ``logits_to_keep=1``, untimed), then runs ``new_tokens`` single-token forwards on that
    cache, which the model extends in place (a manual loop, not ``generate``: no generation config, no EOS stop);
    only that loop is timed. The cache goes in as ``cache=`` where the model's ``forward`` takes that keyword
    (transformers 5.x, where ``past_key_values`` is deprecated) and as ``past_key_values=`` otherwise.

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
        cache_kw = _cache_keyword(hf_model)

        def decode_run() -> float:
            cache = {cache_kw: _new_cache(getattr(hf_model, "config", None))}  # extended in place by each forward
            out = hf_model(input_ids=prompt, use_cache=True, logits_to_keep=1, **cache)
            next_tok = out.logits[:, -1:].argmax(dim=-1)  # (1, 1)
            synchronize(target)
            start = time.perf_counter()
            for _ in range(new_tokens):
                out = hf_model(input_ids=next_tok, use_cache=True, **cache)
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
    log.debug("Latency: %s", result.summary())
    return result


@dataclass(frozen=True)
class Ratio:
    """A ratio measured once per alternation round: its median and its range.

    Args:
        median: median over the rounds.
        low: smallest round's ratio.
        high: largest round's ratio.
        rounds: how many rounds it was measured over.
    """

    median: float
    low: float
    high: float
    rounds: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Ratio:
        """The median and range of ``values`` (one per round)."""
        return cls(statistics.median(values), min(values), max(values), len(values))

    def __str__(self) -> str:
        return f"{self.median:.2f}x (range {self.low:.2f}-{self.high:.2f} over {self.rounds} alternations)"


@dataclass(frozen=True)
class LatencyComparison:
    """Latency of a model and of a reference (e.g. its dense original), timed alternately by :func:`compare_latency`.

    Args:
        model: one :class:`LatencyResult` of the model per round.
        reference: one of the reference per round, measured right before or after the model's in that round.
    """

    model: tuple[LatencyResult, ...]
    reference: tuple[LatencyResult, ...]

    @property
    def rounds(self) -> int:
        """Alternation rounds."""
        return len(self.model)

    def prefill_ratio(self, batch_size: int) -> Ratio:
        """Model prefill time over reference prefill time at ``batch_size`` (below 1: the model is faster)."""
        return Ratio.of(
            [m.prefill_ms[batch_size] / r.prefill_ms[batch_size] for m, r in zip(self.model, self.reference)]
        )

    def decode_ratio(self) -> Ratio:
        """Model decode throughput over reference decode throughput (above 1: the model is faster)."""
        return Ratio.of([m.decode_tokens_per_s / r.decode_tokens_per_s for m, r in zip(self.model, self.reference)])

    def median_model(self) -> LatencyResult:
        """The model's numbers, each the median over the rounds of its per-round median (``repeats``: per round)."""
        return _median_result(self.model)

    def median_reference(self) -> LatencyResult:
        """The reference's numbers, each the median over the rounds."""
        return _median_result(self.reference)

    def summary(self, name: str = "model", reference: str = "reference") -> str:
        """One line per ratio, e.g. ``prefill b1: 0.74x dense (range 0.70-0.78 over 5 alternations)``."""
        lines = [f"prefill b{b}: {name} {self.prefill_ratio(b)} {reference} time" for b in self.model[0].prefill_ms]
        lines.append(f"decode: {name} {self.decode_ratio()} {reference} throughput")
        return "\n".join(lines)


def _median_result(results: Sequence[LatencyResult]) -> LatencyResult:
    first = results[0]
    decode_ms = statistics.median(r.decode_ms_per_token for r in results)
    return LatencyResult(
        prefill_ms={b: statistics.median(r.prefill_ms[b] for r in results) for b in first.prefill_ms},
        decode_tokens_per_s=1e3 / decode_ms,
        decode_ms_per_token=decode_ms,
        prompt_len=first.prompt_len,
        new_tokens=first.new_tokens,
        repeats=first.repeats,
        device=first.device,
        dtype=first.dtype,
        threads=first.threads,
    )


def compare_latency(
    model: nn.Module, reference: nn.Module, rounds: int = 5, **latency_kwargs: Any
) -> LatencyComparison:
    """Time ``model`` and ``reference`` alternately, ``rounds`` times, so load on the machine hits both alike.

    Timing one model and then the other once each makes their ratio meaningless as soon as anything else runs on
    the machine (a burst of load during one of them shows up as a speed-up or slow-down). Here every round times
    both, one right after the other, and the order flips from round to round (reference first in even rounds), so
    drift and warm-up effects cancel too; each ratio is taken within a round and reported with its range.

    Args:
        model: the model to measure (e.g. the pruned one).
        reference: the model to compare it with (e.g. the dense original, kept as a copy).
        rounds: alternation rounds (>= 1).
        **latency_kwargs: arguments of :func:`latency` (``prompt_len``, ``batch_sizes``, ``repeats``, ...).

    Returns:
        A :class:`LatencyComparison` with every round's results.

    Raises:
        ValueError: if ``rounds`` is not a positive int, or as :func:`latency` for its arguments.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2, num_key_value_heads=1)
        >>> cmp = compare_latency(LlamaForCausalLM(cfg), LlamaForCausalLM(cfg), rounds=2, prompt_len=8,
        ...                       batch_sizes=(1,), new_tokens=2, repeats=1)
        >>> cmp.rounds, cmp.prefill_ratio(1).rounds
        (2, 2)
    """
    check_int("rounds", rounds)
    measured: dict[str, list[LatencyResult]] = {"model": [], "reference": []}
    for r in range(rounds):
        order = (
            (("reference", reference), ("model", model)) if r % 2 == 0 else (("model", model), ("reference", reference))
        )
        for which, net in order:
            measured[which].append(latency(net, **latency_kwargs))
    result = LatencyComparison(model=tuple(measured["model"]), reference=tuple(measured["reference"]))
    log.debug("Latency comparison over %d rounds:\n%s", rounds, result.summary())
    return result
