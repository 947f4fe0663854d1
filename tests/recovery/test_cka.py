import pytest
import torch
from conftest import tiny_config
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lit_prune.recovery import cka_importance, select_blocks, take_samples

IDENTITY = (2, 5)  # the last block is one of them


def _model(layers: int = 6, identity=IDENTITY) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(num_hidden_layers=layers))
    with torch.no_grad():
        for i in identity:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    return model


def _padded_batches(n: int = 24, t: int = 12, batch_size: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows of different lengths (pad id 3, attention_mask 0 on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 256, (n, t), generator=g)
    lengths = torch.randint(3, t + 1, (n,), generator=g)
    mask = (torch.arange(t) < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, 3)
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size]}
        for i in range(0, n, batch_size)
    ]


def _linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two ``(n, d)`` feature matrices (Kornblith et al. 2019), float64."""
    x, y = x.double() - x.double().mean(0), y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def _reference_importance(model: LlamaForCausalLM, batches) -> list[float]:
    """1 - CKA between each block's input and its own output at the last non-pad token, by forward hooks."""
    layers = model.model.layers
    ins: list[list[torch.Tensor]] = [[] for _ in layers]
    outs: list[list[torch.Tensor]] = [[] for _ in layers]
    last: list[torch.Tensor] = []

    def hook(i):
        def fn(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            ins[i].append(hidden_in[torch.arange(len(last[-1])), last[-1]])
            outs[i].append(hidden_out[torch.arange(len(last[-1])), last[-1]])

        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mask = batch["attention_mask"]
                last.append(mask.sum(1) - 1)  # right padding: the last non-pad position
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [1 - _linear_cka(torch.cat(a), torch.cat(b)) for a, b in zip(ins, outs)]


def test_importance_matches_a_reference_at_the_last_non_pad_token():
    model = _model(identity=())
    batches = _padded_batches()
    importance = cka_importance(model, batches, n_samples=24)
    assert importance.dtype == torch.float64 and importance.shape == (6,)
    torch.testing.assert_close(
        importance, torch.tensor(_reference_importance(model, batches), dtype=torch.float64), atol=1e-9, rtol=0
    )
    assert bool(((importance > 0) & (importance <= 1)).all())


def test_identity_blocks_get_zero_importance_and_are_never_selected():
    model = _model()
    importance = cka_importance(model, _padded_batches(), n_samples=24)
    others = [i for i in range(6) if i not in IDENTITY]
    assert importance[list(IDENTITY)].abs().max() < 1e-9
    assert importance[others].min() > 1e-3
    assert select_blocks(importance, 4 / 6) == others  # floor(4/6 · 6) = 4: exactly the non-identity blocks
    for ratio in (0.2, 0.34, 0.5):
        assert not set(select_blocks(importance, ratio)) & set(IDENTITY)


def test_last_block_is_scored_on_its_own_output_not_the_final_norm():
    """With Hugging Face's last hidden state (after the final RMSNorm) the identity last block would look important."""
    model = _model()
    batches = _padded_batches()
    importance = cka_importance(model, batches, n_samples=24)
    assert importance[-1] < 1e-9
    assert select_blocks(importance, 0.5)[-1] != 5
    model.eval()
    ins, outs = [], []
    with torch.no_grad():
        for batch in batches:
            hidden = model(**batch, output_hidden_states=True).hidden_states  # L + 1 states, the last post-norm
            rows, last = torch.arange(len(batch["input_ids"])), batch["attention_mask"].sum(1) - 1
            ins.append(hidden[-2][rows, last])
            outs.append(hidden[-1][rows, last])
    assert 1 - _linear_cka(torch.cat(ins), torch.cat(outs)) > 10 * importance[-1] + 1e-3


def test_importance_uses_only_n_samples_rows_and_keeps_the_train_mode():
    model = _model(identity=()).train()
    batches = _padded_batches()
    first = cka_importance(model, batches, n_samples=10)
    assert model.training
    torch.testing.assert_close(first, cka_importance(model, take_samples(batches, 10), n_samples=10))
    torch.testing.assert_close(
        first,
        torch.tensor(_reference_importance(model, take_samples(batches, 10)), dtype=torch.float64),
        atol=1e-9,
        rtol=0,
    )
    assert not torch.allclose(first, cka_importance(model, batches, n_samples=24))


def test_take_samples_cuts_exactly_n_rows_and_stops_reading():
    batches = _padded_batches(n=24, batch_size=8)

    def stream():
        yield {**batches[0], "tag": "a"}
        yield {**batches[1], "tag": "b"}
        raise AssertionError("read a batch that was not needed")

    taken = take_samples(stream(), 11)
    assert [b["input_ids"].size(0) for b in taken] == [8, 3]
    assert [b["attention_mask"].size(0) for b in taken] == [8, 3]
    assert [b["tag"] for b in taken] == ["a", "b"]  # non-tensor entries pass through
    assert torch.equal(taken[1]["input_ids"], batches[1]["input_ids"][:3])
    assert [b["input_ids"].size(0) for b in take_samples(iter(batches), 8)] == [8]
    assert [b["input_ids"].size(0) for b in take_samples(batches, 100)] == [8, 8, 8]  # fewer rows than asked: all
    loader = DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (7, 5))], batch_size=3)
    assert [b["input_ids"].size(0) for b in take_samples(loader, 5)] == [3, 2]


@pytest.mark.parametrize(
    ("batches", "n", "match"),
    [
        ([{"input_ids": torch.ones(2, 3, dtype=torch.long)}], 0, "`n_samples` must be an int >= 1, got 0"),
        ([{"input_ids": torch.ones(2, 3, dtype=torch.long)}], True, "`n_samples` must be an int >= 1, got True"),
        ([{"input_ids": torch.ones(2, 3, dtype=torch.long)}], 2.0, "`n_samples` must be an int >= 1, got 2.0"),
        ([], 4, "No samples to compute CKA layer importance from"),
        ([{"ids": torch.ones(2, 3)}], 4, r"needs batches as dicts with `input_ids`, got \['ids'\]"),
        ([torch.ones(2, 3)], 4, "needs batches as dicts with `input_ids`, got Tensor"),
    ],
)
def test_take_samples_errors(batches, n, match):
    with pytest.raises(ValueError, match=match):
        take_samples(batches, n)


def test_select_blocks_floor_order_and_ties():
    importance = torch.tensor([0.1, 0.9, 0.5, 0.5, 0.5, 0.2], dtype=torch.float64)
    assert select_blocks(importance, 0.5) == [1, 2, 3]  # floor(3.0) = 3, ascending indices
    assert select_blocks(importance, 0.34) == [1, 2]  # floor(2.04) = 2: the tie at 0.5 goes to the lower index
    assert select_blocks(importance, 0.49) == [1, 2]  # floor(2.94) = 2
    assert select_blocks(importance, 1.0) == list(range(6))
    assert select_blocks(torch.zeros(4), 0.25) == [0]  # all tied: lowest indices
    assert len(select_blocks(torch.zeros(100), 0.29)) == 29  # 0.29 · 100 = 28.999999999999996 in floating point
    assert len(select_blocks(torch.zeros(10), 0.7)) == 7


@pytest.mark.parametrize(
    ("ratio", "num_blocks", "match"),
    [
        (0.0, 4, r"`ratio` must be in \(0, 1\], got 0.0"),
        (1.5, 4, r"`ratio` must be in \(0, 1\], got 1.5"),
        (-0.5, 4, r"`ratio` must be in \(0, 1\], got -0.5"),
        (0.2, 4, r"`ratio`=0.2 selects no block of 4 \(floor\(ratio · L\) = 0\)"),
    ],
)
def test_select_blocks_errors(ratio, num_blocks, match):
    with pytest.raises(ValueError, match=match):
        select_blocks(torch.rand(num_blocks), ratio)


def test_linear_cka_from_grams_equals_the_feature_space_formula():
    from lit_prune.recovery.cka import linear_cka

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 40, generator=g, dtype=torch.float64)
    y = x @ torch.randn(40, 30, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        12, 30, generator=g, dtype=torch.float64
    )
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-12)
    assert linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    assert linear_cka(x, 3 * x + 1) == pytest.approx(1.0, rel=1e-12)  # invariant to scale and shift
    constant = torch.ones(12, 30, dtype=torch.float64)
    assert linear_cka(constant, 2 * constant) == 1.0 and linear_cka(x, constant) == 0.0
    with pytest.raises(ValueError, match="same n >= 2"):
        linear_cka(x[:1], y[:1])


def test_the_sequential_loader_reads_the_first_rows_without_touching_the_training_loader():
    from lit_prune.callbacks.lora import sequential

    data = [{"input_ids": torch.full((4,), i)} for i in range(10)]
    g = torch.Generator().manual_seed(0)
    train = DataLoader(data, batch_size=3, shuffle=True, generator=g)
    state = g.get_state()
    private = sequential(train)
    assert [int(b["input_ids"][0, 0]) for b in private] == [0, 3, 6, 9]
    assert torch.equal(g.get_state(), state)  # the training loader's shuffle is untouched
    assert sequential([1, 2]) == [1, 2]  # non-DataLoader iterables pass through
