import json
import logging
import math

import matplotlib.image
import pytest
import torch
from conftest import quiet_trainer, tiny_config
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from transformers import LlamaForCausalLM

from lit_prune import CausalLMModule
from lit_prune.callbacks import DepthPruning, MixtureOfPruners, PruningReport, SparsityPruning, WidthPruning
from lit_prune.cli import _model_shortcut, main, run_prune
from lit_prune.datamodules import TextDataModule
from lit_prune.plan import PruningPlan
from lit_prune.report import RunRecord, block_history, collect_run, write_report
from lit_prune.report.plots import block_score_rows, head_marks, linear_sparsity, sparsity_steps


def _model(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(num_hidden_layers=layers, intermediate_size=96))


def _loader(n: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader([{"input_ids": w} for w in torch.randint(4, 256, (n, 16), generator=g)], batch_size=2)


def _png_shape(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape


def test_block_history_maps_every_step_back_to_the_original_blocks():
    width = PruningPlan(
        num_layers=4,
        method="width:amp",
        params_before=100,
        params_after=90,
        keep_heads={1: (0, 2)},
        keep_neurons={3: (0, 1, 2)},
        heads_before=(4, 4, 4, 4),
        neurons_before=(8, 8, 8, 8),
        meta={"head_scores": [[1, 2, 3, 4]] * 4},
    )
    depth = PruningPlan(
        drop_layers=(0,), num_layers=4, method="depth:bi", params_before=90, params_after=70, scores=(0.1, 5, 6, 7)
    )
    # the second depth step sees 3 blocks: its index 1 is original block 2
    depth2 = PruningPlan(
        drop_layers=(1,), num_layers=3, method="depth:bi", params_before=70, params_after=50, scores=(5, 0.2, 7)
    )
    history = block_history(collect_order([depth2, width, depth]))
    assert history.dropped == [True, False, True, False]
    assert history.heads_before == [4, 4, 4, 4] and history.heads_after == [0, 2, 0, 4]
    assert history.neurons_after == [0, 8, 0, 3]
    first, second = history.block_scores
    assert first.scores == [0.1, 5, 6, 7] and first.dropped == [0]
    assert math.isnan(second.scores[0]) and second.scores[1:] == [5, 0.2, 7] and second.dropped == [2]
    assert history.head_scores[0].scores[3] == [1, 2, 3, 4]
    # the figures get: the heads the width step cut (block 1 keeps 0 and 2), and the blocks dropped in the run
    assert head_marks(history.head_scores[0]) == ([(1, 1), (1, 3)], [0, 2])


def _consensus_plan(**overrides):
    fields = dict(
        drop_layers=(1, 3),
        num_layers=4,
        method="depth:consensus",
        params_before=100,
        params_after=60,
        scores=(4.0, 1.0, 3.0, 2.0),
        meta={
            "criterion": "consensus",
            "component_scores": {"consensus": [4.0, 1.0, 3.0, 2.0], "bi": [0.4, 0.1, 0.3, 0.2], "cka": [1, 0, 1, 0]},
        },
    )
    fields.update(overrides)
    return PruningPlan(**fields)


def test_block_scores_show_every_sub_score_with_the_removed_blocks():
    rows = block_score_rows(block_history([_consensus_plan()]))
    assert [(label.strip(), marked) for label, _, marked in rows] == [
        ("1: depth:consensus", [1, 3]),
        ("bi", [1, 3]),
        ("cka", [1, 3]),
    ]
    assert rows[1][1] == [0.4, 0.1, 0.3, 0.2]
    # a plan that did not record sub-scores (or recorded them for another model) keeps its one row
    plain = _consensus_plan(meta={"criterion": "consensus", "component_scores": {"bi": [0.1, 0.2]}})
    assert [label for label, _, _ in block_score_rows(block_history([plain]))] == ["1: depth:consensus"]
    assert len(block_score_rows(block_history([_consensus_plan(meta={})]))) == 1


def _sparsity_plan(**meta):
    base = {"sparsity": 0.5, "zeros": 50, "prunable": 100, "block_ratios": [0.4, 0.6], "block_sparsity": [0.4, 0.6]}
    return PruningPlan(num_layers=2, method="sparsity:wanda", params_before=10, params_after=10, meta=base | meta)


def test_sparsity_figure_data():
    depth = PruningPlan(drop_layers=(0,), num_layers=3, method="depth:bi", params_before=20, params_after=10)
    steps = sparsity_steps([depth, _sparsity_plan()])
    assert [(i, p.method) for i, p in steps] == [(2, "sparsity:wanda")]
    layers = {
        "model.layers.1.mlp.down_proj": 0.7,
        "model.layers.0.self_attn.q_proj": 0.3,
        "model.layers.1.self_attn.q_proj": 0.5,
    }
    names, rows = linear_sparsity({"layer_sparsity": layers}, 2)
    assert names == ["q_proj", "down_proj"]  # projection order, not name order
    assert rows[0] == [0.3, 0.5] and math.isnan(rows[1][0]) and rows[1][1] == 0.7
    assert linear_sparsity({}, 2) is None
    assert linear_sparsity({"layer_sparsity": {"lm_head": 0.5}}, 2) is None  # no block index: bars only


def test_rewriting_a_report_removes_its_stale_figures_only(tmp_path, caplog):
    width = PruningPlan(
        num_layers=4,
        method="width:amp",
        params_before=100,
        params_after=90,
        keep_heads={1: (0, 2)},
        heads_before=(4, 4, 4, 4),
        meta={"head_scores": [[1, 2, 3, 4]] * 4},
    )
    out = tmp_path / "out"
    write_report(RunRecord(folder=tmp_path, plans=[width, _consensus_plan(params_before=90)]), out)
    figures = out / "report"
    assert sorted(p.name for p in figures.iterdir()) == ["block_scores.png", "head_scores.png", "structure.png"]
    (figures / "notes.png").write_bytes(b"mine")  # not the report's: left alone
    with caplog.at_level(logging.INFO, logger="lit_prune.report.markdown"):
        text = write_report(RunRecord(folder=tmp_path, plans=[_sparsity_plan()]), out).read_text()
    assert "Removed 2 figure(s) of an earlier report" in caplog.text and "'head_scores.png'" in caplog.text
    assert sorted(p.name for p in figures.iterdir()) == ["notes.png", "sparsity.png", "structure.png"]
    assert "(report/sparsity.png)" in text and "head_scores" not in text
    _png_shape(figures / "sparsity.png")


def collect_order(plans):
    return sorted(plans, key=lambda p: -p.params_before)  # what collect_run does


def test_a_pruning_fit_writes_the_report_with_its_figures(tmp_path):
    model = _model()
    module = CausalLMModule(model=model)
    callbacks = [
        WidthPruning(amount=0.2, calibration=_loader(), verbose=0),
        DepthPruning(num_layers=1, criterion="consensus", calibration=_loader(), verbose=0),
    ]
    quiet_trainer(tmp_path, callbacks, max_steps=1).fit(module, train_dataloaders=_loader(4, seed=1))
    history = block_history(collect_run(tmp_path).plans)
    assert list(history.block_scores[0].components) == ["bi", "angular", "cka"]  # what the depth plan recorded
    report = tmp_path / "report.md"
    text = report.read_text()
    for figure in ("structure", "block_scores", "head_scores"):
        assert f"(report/{figure}.png)" in text
        height, width, _ = _png_shape(tmp_path / "report" / f"{figure}.png")
        assert height > 100 and width > 100
    total = sum(p.numel() for p in model.parameters())
    assert f"{total:,}" in text  # the pruned parameter count in the comparison table
    assert "`width:amp`" in text and "`depth:consensus`" in text
    assert text.count("| dropped |") == 1
    assert "add the `lit_prune.callbacks.PruningReport` callback" in text


def test_a_sparsity_fit_gets_a_sparsity_figure(tmp_path):
    callback = SparsityPruning(criterion="magnitude", sparsity=0.5, calibration=_loader(), verbose=0)
    quiet_trainer(tmp_path, [callback], max_steps=1).fit(CausalLMModule(model=_model()), train_dataloaders=_loader())
    text = (tmp_path / "report.md").read_text()
    assert "(report/sparsity.png)" in text and "block_scores" not in text
    _png_shape(tmp_path / "report" / "sparsity.png")


def test_mop_report_has_the_path_and_its_figure(tmp_path):
    module = CausalLMModule(model=_model(6))
    mop = MixtureOfPruners(target=0.3, proxy="ppl", calibration=_loader(), save_model=False, verbose=0)
    quiet_trainer(tmp_path, [mop], max_steps=1).fit(module, train_dataloaders=_loader(4, seed=1))
    text = (tmp_path / "report.md").read_text()
    assert f"Path `{mop.path}`" in text
    assert len(mop.path) >= 2 and text.count("\n| ") >= len(mop.path)
    _png_shape(tmp_path / "report" / "mop_path.png")


def _piqa(root, n=3):
    (root / "piqa").mkdir(parents=True)
    rows = [
        {"id": str(i), "goal": f"how to fix thing {i}?", "sol1": "use glue", "sol2": "use a hammer"} for i in range(n)
    ]
    (root / "piqa/dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "piqa/dev-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(n)))
    return root


def test_pruning_report_measures_dense_and_pruned(tmp_path, tiny_tokenizer, text_file):
    model = _model()
    dense_params = sum(p.numel() for p in model.parameters())
    module = CausalLMModule(model=model, tokenizer=tiny_tokenizer)
    data = TextDataModule(
        tokenizer=tiny_tokenizer,
        path=str(text_file),
        val_path=str(text_file),
        seq_len=16,
        batch_size=2,
        max_val_windows=4,
        calibration_windows=4,
        cache_dir=str(tmp_path / "cache"),
    )
    report = PruningReport(
        max_windows=3,
        prompt_len=8,
        batch_sizes=[1],
        new_tokens=2,
        repeats=1,
        tasks=["piqa"],
        data_dir=str(_piqa(tmp_path / "data")),
        verbose=0,
    )
    depth = DepthPruning(num_layers=1, verbose=0)
    quiet_trainer(tmp_path, [depth, report], max_steps=1, limit_val_batches=0).fit(module, datamodule=data)
    assert report.dense.params.total == dense_params
    assert report.pruned.params.total == sum(p.numel() for p in model.parameters()) < dense_params
    assert report.dense.ppl.windows == 3 and report.pruned.ppl.ppl != report.dense.ppl.ppl
    assert report.dense.zeroshot.n_items == {"piqa": 3}
    record = collect_run(tmp_path)
    assert record.dense.ppl.ppl == pytest.approx(report.dense.ppl.ppl)
    assert record.pruned.latency.prefill_ms == report.pruned.latency.prefill_ms  # batch-size keys back to ints
    text = report.report_path.read_text()
    assert f"| perplexity | {report.dense.ppl.ppl:.2f} | {report.pruned.ppl.ppl:.2f} |" in text
    assert "| piqa acc, % |" in text and "| prefill latency, batch 1 |" in text and "decode, batch 1" in text


def test_pruning_report_rejects_bad_arguments():
    with pytest.raises(MisconfigurationException, match="`max_windows` must be None or an int >= 1, got 0"):
        PruningReport(max_windows=0)
    with pytest.raises(MisconfigurationException, match="`batch_sizes` must be a non-empty list"):
        PruningReport(batch_sizes=[])
    with pytest.raises(MisconfigurationException, match="`tasks` must be None or a non-empty list"):
        PruningReport(tasks="piqa")


def test_report_command_rewrites_the_report_and_explains_bad_folders(tmp_path, capsys):
    module = CausalLMModule(model=_model())
    quiet_trainer(tmp_path / "run", [DepthPruning(num_layers=1, calibration=_loader(), verbose=0)], max_steps=1).fit(
        module, train_dataloaders=_loader()
    )
    main(["report", str(tmp_path / "run"), "--output", str(tmp_path / "out")])
    assert "Wrote" in capsys.readouterr().out
    assert "`depth:bi`" in (tmp_path / "out/report.md").read_text()
    _png_shape(tmp_path / "out/report/structure.png")
    with pytest.raises(SystemExit, match="does not exist"):
        main(["report", str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="No pruning plan under"):
        main(["report", str(tmp_path / "empty")])
    (tmp_path / "two/a").mkdir(parents=True)
    (tmp_path / "two/b").mkdir(parents=True)
    for sub in ("a", "b"):
        PruningPlan(drop_layers=(0,), num_layers=4, params_before=10, params_after=5).to_json(
            tmp_path / f"two/{sub}/depth-plan-1.json"
        )
    with pytest.raises(SystemExit, match="Plan files of several runs"):
        main(["report", str(tmp_path / "two")])


def test_report_from_a_saved_model_folder(tmp_path):
    plan = PruningPlan(drop_layers=(2,), num_layers=4, method="depth:bi", params_before=10, params_after=8)
    (tmp_path / "pruning_plans.json").write_text(json.dumps([plan.to_dict()]))
    text = write_report(tmp_path).read_text()
    assert "| 2 | dropped |" in text and "10 → 8" in text


def test_eval_model_shortcut():
    assert _model_shortcut(["--model", "runs/x", "--tasks", "piqa"]) == ["--model.model", "runs/x", "--tasks", "piqa"]
    assert _model_shortcut(["--model=builtin:smollm2-135m-instruct"]) == [
        "--model.model",
        "builtin:smollm2-135m-instruct",
    ]
    assert _model_shortcut(["--model", "model.yaml"]) == ["--model", "model.yaml"]
    assert _model_shortcut(["--model.lr", "1e-3"]) == ["--model.lr", "1e-3"]


def test_prune_command_writes_a_report(tmp_path, tiny_model_dir, text_file):
    import yaml

    cfg = {
        "model": {"model": str(tiny_model_dir)},
        "data": {
            "class_path": "lit_prune.datamodules.TextDataModule",
            "init_args": {
                "path": str(text_file),
                "seq_len": 16,
                "calibration_windows": 4,
                "cache_dir": str(tmp_path / "cache"),
            },
        },
        "trainer": {
            "accelerator": "cpu",
            "logger": False,
            "callbacks": [{"class_path": "lit_prune.callbacks.WidthPruning", "init_args": {"amount": 0.1}}],
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run_prune(["--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "pruned")])
    text = (tmp_path / "pruned/report.md").read_text()
    assert "`width:amp`" in text and "(report/head_scores.png)" in text
