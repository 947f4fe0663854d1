from __future__ import annotations

import math

import pytest
import torch

from lit_prune.allocation.sparsity import (
    DSA_PAPER_FUNCTION,
    SPARSITY_ALLOCATIONS,
    AllocationFunction,
    dsa,
    layer_counts,
    linear_map,
    outlier_ratio,
    owl,
    uniform,
)
from lit_prune.allocation.trim import trim

SEEDS = (0, 1, 2, 3)


def _wmean(ratios: list[float], sizes: list[int] | None) -> float:
    sizes = sizes or [1] * len(ratios)
    return sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes)


def _random_sizes(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 5000, (n,), generator=gen).tolist()


def _in_band(ratios: list[float], lo: float, hi: float) -> bool:
    return all(lo - 1e-12 <= r <= hi + 1e-12 for r in ratios)


# --- uniform / outlier ratio ---------------------------------------------------------------------------------------
def test_uniform() -> None:
    assert uniform([3, 5, 7], 0.6) == [0.6, 0.6, 0.6]
    assert SPARSITY_ALLOCATIONS == ("uniform", "owl", "linear_map", "dsa")


def test_outlier_ratio_hand_made() -> None:
    # mean over the block's concatenated scores = (8 * 1 + 10 + 22) / 10 = 4; M = 2 -> threshold 8: two outliers.
    q = torch.ones(2, 2)
    q[0, 0] = 10.0
    up = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 22.0]])
    assert outlier_ratio([q, up], m=2.0) == pytest.approx(0.2)
    # a per-Linear mean would differ: q alone has mean 3.25, threshold 6.5, one outlier of four
    assert outlier_ratio(q, m=2.0) == pytest.approx(0.25)
    assert outlier_ratio(up.to(torch.bfloat16), m=2.0) == pytest.approx(1 / 6)
    assert outlier_ratio(torch.ones(5), m=1.0) == 0.0  # strictly greater than M * mean


# --- OWL -----------------------------------------------------------------------------------------------------------
def test_owl_matches_reference_code() -> None:
    """Equal sizes, values staying in the band: exactly the OWL code's ``d - mean(d) + (1 - S)`` densities."""
    ratios, s, lam = [2.0, 5.0, 3.0, 4.0], 0.7, 0.08
    d = [(r - 2.0) / 3.0 * 2 * lam for r in ratios]
    expected = [1 - (x - sum(d) / 4 + (1 - s)) for x in d]
    assert owl(ratios, s, lam) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_owl_mean_band_monotone(seed: int, weighted: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    ratios = (torch.rand(12, generator=gen) ** 3 * 10).tolist()  # skewed: the plain shift would leave the band
    sizes = _random_sizes(seed, 12) if weighted else None
    s, lam = 0.6, 0.1
    out = owl(ratios, s, lam, sizes=sizes)
    assert _wmean(out, sizes) == pytest.approx(s, abs=1e-9)
    assert _in_band(out, s - lam, s + lam)
    for i in range(12):
        for j in range(12):
            if ratios[i] > ratios[j]:
                assert out[i] <= out[j] + 1e-12  # more outliers -> less sparsity
    most, least = ratios.index(max(ratios)), ratios.index(min(ratios))
    assert out[most] < out[least]


def test_owl_clips_into_band() -> None:
    # the OWL code would give the outlier layer S - 1.5 lam; clipped at S - lam, the others re-balanced
    out = owl([0.0, 0.0, 0.0, 1.0], 0.5, 0.08)
    assert out[3] == pytest.approx(0.42)
    assert out[:3] == pytest.approx([(4 * 0.5 - 0.42) / 3] * 3)
    assert sum(out) / 4 == pytest.approx(0.5, abs=1e-12)


def test_owl_equal_ratios_or_zero_lambda_is_uniform() -> None:
    assert owl([3.0, 3.0, 3.0], 0.5, 0.08) == [0.5, 0.5, 0.5]
    assert owl([1.0, 2.0], 0.5, 0.0) == [0.5, 0.5]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 0.0}, r"`sparsity` must be a number in \(0.0, 1.0\), got 0.0"),
        ({"sparsity": 1.0}, "`sparsity` must be a number"),
        ({"sparsity": True}, "`sparsity` must be a number"),
        ({"sparsity": "0.5"}, "`sparsity` must be a number"),
        ({"lam": -0.1}, r"`lam` must be a number in \[0.0, inf\), got -0.1"),
        ({"sparsity": 0.95}, r"`sparsity`=0.95 with `lam`=0.08 gives the band \[0.87, 1.03\], which leaves \[0, 1\)"),
        ({"sparsity": 0.05}, r"`sparsity`=0.05 with `lam`=0.08 gives the band \[-0.03"),
        ({"sizes": [1, 2]}, r"`sizes` must hold one entry per layer \(3\), got 2"),
        ({"sizes": [1, 0, 2]}, r"`sizes\[1\]` must be an int >= 1, got 0"),
        ({"outlier_ratios": []}, "`outlier_ratios` must hold at least one value"),
        ({"outlier_ratios": [1.0, math.nan]}, "all finite"),
        ({"outlier_ratios": ["a"]}, "`outlier_ratios` must be a sequence of numbers"),
    ],
)
def test_owl_misconfiguration(kwargs: dict, match: str) -> None:
    args = {"outlier_ratios": [1.0, 2.0, 3.0], "sparsity": 0.5, "lam": 0.08} | kwargs
    with pytest.raises(ValueError, match=match):
        owl(**args)


def test_validation_of_other_functions() -> None:
    with pytest.raises(ValueError, match="`sizes` must hold at least one layer"):
        uniform([], 0.5)
    with pytest.raises(ValueError, match=r"`m` must be a number in \(0.0, inf\), got 0"):
        outlier_ratio(torch.ones(3), m=0)
    with pytest.raises(ValueError, match="`scores` must hold at least one score"):
        outlier_ratio([torch.ones(0)], m=5.0)
    with pytest.raises(TypeError, match="`scores` must be a Tensor or a sequence of Tensors"):
        outlier_ratio([[1.0, 2.0]], m=5.0)  # type: ignore[list-item]


# --- linear map ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
def test_linear_map_range_mean_direction(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(10, generator=gen).tolist()
    sizes = _random_sizes(seed, 10)
    s, eps = 0.5, 0.2
    for higher in ("sparser", "denser"):
        out = linear_map(scores, s, eps, sizes=sizes, higher=higher)
        assert _wmean(out, sizes) == pytest.approx(s, abs=1e-9)
        assert _in_band(out, s * (1 - eps), s * (1 + eps))
        top, bottom = scores.index(max(scores)), scores.index(min(scores))
        assert (out[top] > out[bottom]) == (higher == "sparser")
    flipped = linear_map([-x for x in scores], s, eps, sizes=sizes, higher="denser")
    assert flipped == pytest.approx(linear_map(scores, s, eps, sizes=sizes), abs=1e-12)


def test_linear_map_misconfiguration() -> None:
    with pytest.raises(ValueError, match=r"`eps` must be a number in \[0.0, 1.0\], got 1.5"):
        linear_map([1.0, 2.0], 0.3, 1.5)
    with pytest.raises(ValueError, match=r"`sparsity`=0.8 with `eps`=0.3 gives the band"):
        linear_map([1.0, 2.0], 0.8, 0.3)
    with pytest.raises(ValueError, match=r"`higher` must be one of \['sparser', 'denser'\], got 'more'"):
        linear_map([1.0, 2.0], 0.5, 0.1, higher="more")  # type: ignore[arg-type]


# --- DSA -----------------------------------------------------------------------------------------------------------
def test_allocation_function_parse() -> None:
    fn = AllocationFunction.parse(DSA_PAPER_FUNCTION)
    assert fn == AllocationFunction(pre=("log", "log", "abs"), reduce="geomean", post=("cos", "exp"))
    assert str(fn) == DSA_PAPER_FUNCTION
    assert AllocationFunction.parse(" ABS | Mean ") == AllocationFunction(pre=("abs",), reduce="mean")
    assert AllocationFunction(pre=["abs"], post=["exp"]).pre == ("abs",)  # type: ignore[arg-type]  # YAML lists


@pytest.mark.parametrize(
    ("spec", "scores", "expected"),
    [
        # ln(e^e) = e, ln(e) = 1, geomean(1, 1) = 1, exp(cos 1)
        (DSA_PAPER_FUNCTION, torch.full((2,), math.exp(math.e), dtype=torch.float64), math.exp(math.cos(1.0))),
        ("square|median", [torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])], 4.0),
        ("std", torch.tensor([1.0, 3.0]), 1.0),
        ("var|sqrt", torch.tensor([0.0, 4.0]), 2.0),
        ("l1|neg", torch.tensor([-1.0, 2.0, -3.0]), -2.0),
        ("l2", torch.tensor([3.0, -3.0, 3.0, -3.0]), 3.0),
        ("geomean", [torch.tensor([1.0, 4.0]), torch.tensor([16.0])], 4.0),
        ("sqrt|max|square", torch.tensor([-9.0, 4.0]), 9.0),
        ("abs|min|log|abs", torch.tensor([-math.e, 5.0]), 1.0),
        ("identity|mean|sin|atan", torch.tensor([0.0]), 0.0),
        ("sigmoid|mean|sigmoid", torch.tensor([0.0]), 1 / (1 + math.exp(-0.5))),
    ],
)
def test_allocation_function_values(spec: str, scores: torch.Tensor | list[torch.Tensor], expected: float) -> None:
    assert AllocationFunction.parse(spec)(scores) == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("abs|foo|mean", r"`pre` operators must be among \['abs', 'exp', .*\], got 'foo'"),
        ("abs||mean", "`pre` operators must be among .* got ''"),
        ("mean|cosh", r"`post` operators must be among \[.*'cos'.*\], got 'cosh'"),
        ("abs|log", r"`spec` must hold exactly one reduction among \['geomean', 'l1', 'l2', 'max'"),
        ("mean|max", "exactly one reduction"),
    ],
)
def test_allocation_function_unknown_ops(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AllocationFunction.parse(spec)


def test_allocation_function_misconfiguration() -> None:
    with pytest.raises(ValueError, match=r"`reduce` operators must be among \[.*\], got 'sum'"):
        AllocationFunction(reduce="sum")
    with pytest.raises(TypeError, match="`spec` must be a str"):
        AllocationFunction.parse(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'exp|mean' is not finite"):
        AllocationFunction.parse("exp|mean")(torch.tensor([1000.0]))
    with pytest.raises(TypeError, match="`function` must be an AllocationFunction or a str"):
        dsa([torch.ones(2)], 3, 0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", SEEDS)
def test_dsa_band_mean_direction(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    blocks = [[torch.rand(4, 8, generator=gen) * (b + 1), torch.rand(8, 3, generator=gen)] for b in range(6)]
    sizes = [59] * 6
    s, lam = 0.65, 0.08
    values = [AllocationFunction.parse("abs|mean")(b) for b in blocks]
    for higher in ("sparser", "denser"):
        out = dsa(blocks, "abs|mean", s, lam, sizes=sizes, higher=higher)
        assert _wmean(out, sizes) == pytest.approx(s, abs=1e-9)
        assert _in_band(out, s - lam, s + lam)
        top, bottom = values.index(max(values)), values.index(min(values))
        assert (out[top] > out[bottom]) == (higher == "sparser")
    paper = dsa(blocks, AllocationFunction.parse(DSA_PAPER_FUNCTION), s, lam)
    assert sum(paper) / 6 == pytest.approx(s, abs=1e-9)
    assert dsa([torch.ones(3), torch.ones(5)], "mean", s, lam) == [s, s]


# --- integer counts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.73, 0.999])
def test_layer_counts_exact_total(seed: int, sparsity: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 1 + seed * 5
    sizes = torch.randint(1, 300, (n,), generator=gen).tolist()
    target = round(sparsity * sum(sizes))
    random_ratios = torch.rand(n, generator=gen).tolist()  # their mean is not the sparsity
    consistent = [sparsity] * n if n == 1 else linear_map(random_ratios, sparsity, 0.0005, sizes=sizes)
    for ratios in (random_ratios, consistent):
        counts = layer_counts(ratios, sizes, sparsity)
        assert sum(counts) == target
        assert all(isinstance(c, int) and 0 <= c <= size for c, size in zip(counts, sizes))
    assert all(abs(c - r * size) < 1 for c, r, size in zip(counts, consistent, sizes))  # largest remainders


def test_layer_counts_misconfiguration() -> None:
    with pytest.raises(ValueError, match=r"`ratios` must all lie in \[0, 1\], got \[0.5, 1.5\]"):
        layer_counts([0.5, 1.5], [10, 10], 0.5)
    with pytest.raises(ValueError, match=r"`sizes` must hold one entry per layer \(2\), got 1"):
        layer_counts([0.5, 0.5], [10], 0.5)
    with pytest.raises(ValueError, match="`sparsity` must be a number"):
        layer_counts([0.5], [10], 1.0)


# --- TRIM ----------------------------------------------------------------------------------------------------------
def _layer_cosine(weight: torch.Tensor, scores: torch.Tensor, inputs: torch.Tensor, counts: torch.Tensor) -> float:
    """Independent reference: prune each row's lowest-scored weights with a loop, cosine of the flat outputs."""
    pruned = weight.clone()
    for r, k in enumerate(counts.tolist()):
        pruned[r, scores[r].argsort(stable=True)[:k]] = 0.0
    a, b = (inputs @ weight.T).double().flatten(), (inputs @ pruned.T).double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _case(seed: int, out_f: int = 16, in_f: int = 32, n: int = 24) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=gen) * torch.rand(out_f, 1, generator=gen) ** 2
    inputs = torch.randn(n, in_f, generator=gen) * torch.rand(in_f, generator=gen) * 3
    return weight, weight.abs() * inputs.norm(dim=0), inputs  # Wanda scores


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("fraction", [0.5, 0.71, 0.9])
def test_trim_exact_bounded_never_worse(seed: int, fraction: float) -> None:
    weight, scores, inputs = _case(seed)
    count = round(fraction * weight.numel())
    counts = trim(weight, scores, inputs, count)
    assert counts.dtype == torch.int64
    assert counts.shape == (16,)
    assert int(counts.sum()) == count
    assert int(counts.min()) >= 0 and int(counts.max()) <= 32
    base = count // 16
    start = torch.tensor([base + 1] * (count - 16 * base) + [base] * (16 - count + 16 * base))
    assert _layer_cosine(weight, scores, inputs, counts) >= _layer_cosine(weight, scores, inputs, start) - 1e-9


def test_trim_spares_fragile_row() -> None:
    """Rows dominated by a few heavy weights lose little; the row with evenly spread weights must prune less."""
    gen = torch.Generator().manual_seed(0)
    out_f, in_f = 8, 64
    weight = torch.randn(out_f, in_f, generator=gen) * 0.01
    weight[1:, :4] = 10.0  # rows 1..7: four heavy weights each, the rest tiny
    weight[0] = torch.sign(torch.randn(in_f, generator=gen))  # row 0: all weights of the same magnitude
    inputs = torch.randn(32, in_f, generator=gen)
    scores = weight.abs() * inputs.norm(dim=0)
    count = out_f * in_f // 2
    counts = trim(weight, scores, inputs, count)
    assert int(counts.sum()) == count
    assert int(counts[0]) < in_f // 2 < int(counts[1:].min())
    uniform_counts = torch.full((out_f,), in_f // 2)
    assert _layer_cosine(weight, scores, inputs, counts) > _layer_cosine(weight, scores, inputs, uniform_counts)


def test_trim_trivial_cases() -> None:
    weight, scores, inputs = _case(0, out_f=4, in_f=8)
    assert trim(weight, scores, inputs, 0).tolist() == [0, 0, 0, 0]
    assert trim(weight, scores, inputs, 32).tolist() == [8, 8, 8, 8]
    assert trim(weight, scores, inputs, 10, iterations=0).tolist() == [3, 3, 2, 2]
    assert int(trim(weight.double(), scores, inputs.double(), 13).sum()) == 13


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": torch.ones(4, 7)}, r"got weight.shape=\(4, 8\), scores.shape=\(4, 7\), inputs.shape=\(5, 8\)"),
        ({"inputs": torch.ones(5, 7)}, r"`inputs` \(n, in\), got .*inputs.shape=\(5, 7\)"),
        ({"count": 33}, r"`count` must be at most out·in = 32, got 33"),
        ({"count": -1}, r"`count` must be an int >= 0, got -1"),
        ({"iterations": -1}, r"`iterations` must be an int >= 0, got -1"),
        ({"learning_rates": (0.1, 0.0)}, r"`learning_rates` must be finite non-zero numbers, got \[0.1, 0.0\]"),
        ({"max_row_sparsity": 0.0}, r"`max_row_sparsity` must be a number in \(0.0, 1.0\], got 0.0"),
    ],
)
def test_trim_misconfiguration(kwargs: dict, match: str) -> None:
    args = {"weight": torch.ones(4, 8), "scores": torch.ones(4, 8), "inputs": torch.ones(5, 8), "count": 16} | kwargs
    with pytest.raises(ValueError, match=match):
        trim(**args)
