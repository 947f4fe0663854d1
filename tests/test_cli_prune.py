"""``lit-prune prune``: --plan replay (sparsity too), --output / --overwrite safety, data paths checked first."""

import json
import logging

import pytest
import torch
from conftest import tiny_cli_config
from transformers import LlamaForCausalLM

import lit_prune.module as module_mod
from lit_prune.callbacks import DepthPruning
from lit_prune.cli import main, run_prune
from lit_prune.cli_errors import CLIError
from lit_prune.plan import PruningPlan

DEPTH = [{"class_path": "lit_prune.callbacks.DepthPruning", "init_args": {"criterion": "bi", "num_layers": 1}}]


def _config(tmp_path, model_dir, text_file, callbacks=DEPTH, name="c.yaml", **data):
    return str(tiny_cli_config(tmp_path, model_dir, text_file, data={"calibration_windows": 4, **data},
                               trainer={"callbacks": callbacks}, name=name))


def _no_scoring(monkeypatch):
    def refuse(self, pl_module, calibration):
        raise AssertionError("scored although --plan was given")

    monkeypatch.setattr(DepthPruning, "prune_all", refuse)


def test_plan_replays_a_saved_model_folder_without_scoring(tmp_path, tiny_model_dir, text_file, monkeypatch, caplog):
    (first,) = run_prune(["--config", _config(tmp_path, tiny_model_dir, text_file), "--output", str(tmp_path / "a")])
    _no_scoring(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="lit_prune.cli"):
        (replayed,) = run_prune(["--config", _config(tmp_path, tiny_model_dir, text_file), "--output",
                                 str(tmp_path / "b"), "--plan", str(tmp_path / "a")])
    assert "--plan given: the config's pruning callbacks ['DepthPruning'] are skipped" in caplog.text
    assert replayed == first
    a, b = LlamaForCausalLM.from_pretrained(tmp_path / "a"), LlamaForCausalLM.from_pretrained(tmp_path / "b")
    assert b.config.num_hidden_layers == 3
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, msg=name)
    assert json.loads((tmp_path / "b" / "pruning_plans.json").read_text()) == [first.to_dict()]


@pytest.mark.parametrize("form", ["object", "list"])
def test_plan_accepts_one_plan_or_a_list_and_needs_no_callbacks(tmp_path, tiny_model_dir, text_file, form, capsys):
    plans = [PruningPlan(drop_layers=[0], num_layers=4, method="depth:hand"),
             PruningPlan(drop_layers=[2], num_layers=3, method="depth:hand2")]
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans[0].to_dict() if form == "object" else [p.to_dict() for p in plans]))
    got = run_prune(["--config", _config(tmp_path, tiny_model_dir, text_file, callbacks=[]), "--output",
                     str(tmp_path / "o"), "--plan", str(path)])
    expected = plans[:1] if form == "object" else plans
    assert got == expected
    assert LlamaForCausalLM.from_pretrained(tmp_path / "o").config.num_hidden_layers == 4 - len(expected)
    assert capsys.readouterr().out.startswith(f"Pruned with {', '.join(p.method for p in expected)}: params ")


def test_plan_errors(tmp_path, tiny_model_dir, text_file, monkeypatch):
    cfg = _config(tmp_path, tiny_model_dir, text_file, callbacks=[])
    with pytest.raises(CLIError, match=r"^--plan: No pruning plan file at .*missing\.json"):
        run_prune(["--config", cfg, "--plan", str(tmp_path / "missing.json")])
    sparse = tmp_path / "sparse.json"  # what lit-prune wrote before plan format version 3: no record to replay
    old = PruningPlan(num_layers=4, method="sparsity:wanda", meta={"sparsity": 0.5}).to_dict()
    old = {k: v for k, v in old.items() if k not in ("sparsity", "reconstruction")}
    sparse.write_text(json.dumps(old | {"version": 2}))
    with pytest.raises(CLIError, match=r"plan \[0\] \(sparsity:wanda\) is a sparsity plan without a `sparsity` "
                       r"record \(written by an older lit-prune, plan format version 2\).* cannot be replayed"):
        run_prune(["--config", cfg, "--plan", str(sparse), "--output", str(tmp_path / "o")])
    other = tmp_path / "other.json"
    PruningPlan(drop_layers=[1], num_layers=6, method="depth:bi").to_json(other)
    with pytest.raises(CLIError, match=r"plan \[0\] \(depth:bi\) does not fit the model: .*6 blocks, this one has 4"):
        run_prune(["--config", cfg, "--plan", str(other), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    with pytest.raises(CLIError, match="no pruning callback under `trainer.callbacks`.*or replay saved plans"):
        run_prune(["--config", cfg, "--output", str(tmp_path / "o")])


def test_missing_data_path_fails_before_the_model_loads(tmp_path, tiny_model_dir, text_file, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data paths were checked")

    monkeypatch.setattr(module_mod, "load_model", no_loading)
    typo = str(tmp_path / "wiki.valdi.raw")
    cfg = _config(tmp_path, tiny_model_dir, text_file, path=typo)
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--config", cfg])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2
    assert err[0] == (f"lit-prune prune: error: --data.path: file {typo!r} does not exist "
                      "(data.init_args.path in the config)")
    monkeypatch.setenv("LIT_PRUNE_DATA_DIR", str(tmp_path))
    cfg = _config(tmp_path, tiny_model_dir, text_file, calibration_path="data://wikitext2/nope.raw")
    with pytest.raises(CLIError, match=r"--data.calibration_path: file 'data://wikitext2/nope.raw' \(.*nope.raw\)"):
        run_prune(["--config", cfg])
    cfg = _config(tmp_path, tiny_model_dir, text_file, val_path="wikitext")  # a dataset name: left to the datamodule
    monkeypatch.setattr(DepthPruning, "prune_all", no_loading)
    with pytest.raises(AssertionError, match="before the data paths"):  # got past the check, to loading
        run_prune(["--config", cfg])


def test_existing_output_needs_overwrite_which_clears_it(tmp_path, tiny_model_dir, text_file):
    cfg, out = _config(tmp_path, tiny_model_dir, text_file), tmp_path / "o"
    run_prune(["--config", cfg, "--output", str(out)])
    stale = out / "report" / "stale.png"
    stale.write_bytes(b"old figure")
    with pytest.raises(CLIError, match=r"--output '.*o' already exists and is not empty; pass --overwrite"):
        run_prune(["--config", cfg, "--output", str(out)])
    assert stale.is_file()
    run_prune(["--config", cfg, "--output", str(out), "--overwrite"])
    assert not stale.exists() and (out / "pruning_plans.json").is_file() and (out / "report.md").is_file()


def test_overwrite_refuses_folders_lit_prune_did_not_write(tmp_path, tiny_model_dir, text_file, monkeypatch):
    cfg = _config(tmp_path, tiny_model_dir, text_file)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    with pytest.raises(CLIError, match=r"--overwrite refuses to replace '.*mine': it holds no pruning_plans.json"):
        run_prune(["--config", cfg, "--output", str(mine), "--overwrite"])
    assert (mine / "config.json").is_file()
    (mine / "pruning_plans.json").write_text("[]")
    monkeypatch.chdir(mine)
    with pytest.raises(CLIError, match="it is the current, home or root folder"):
        run_prune(["--config", cfg, "--output", ".", "--overwrite"])
    with pytest.raises(CLIError, match="exists and is not a folder"):
        run_prune(["--config", cfg, "--output", str(mine / "config.json")])


def test_sparsity_summary_says_how_sparse(tmp_path, tiny_model_dir, text_file, capsys):
    callbacks = [{"class_path": "lit_prune.callbacks.SparsityPruning",
                  "init_args": {"criterion": "magnitude", "sparsity": 0.5}}]
    out = tmp_path / "o"
    run_prune(["--config", _config(tmp_path, tiny_model_dir, text_file, callbacks=callbacks), "--output", str(out)])
    reloaded = LlamaForCausalLM.from_pretrained(out)
    nonzero = sum(int(torch.count_nonzero(p)) for p in reloaded.parameters())
    first = capsys.readouterr().out.splitlines()[0]
    total = sum(p.numel() for p in reloaded.parameters())
    assert first == (f"Pruned with sparsity:magnitude: params {total:,} -> {total:,}; sparsity 50.00% of the prunable "
                     f"weights, nonzero params {nonzero:,}")
    assert nonzero < total


SPARSEGPT_OWL = [{"class_path": "lit_prune.callbacks.SparsityPruning",
                  "init_args": {"criterion": "sparsegpt", "sparsity": 0.6, "allocation": "owl", "verbose": 0}}]


def _zeros(model):
    from lit_prune.sparse import prunable_linears

    return {name: lin.weight == 0 for name, lin in prunable_linears(model).items()}


def test_a_sparsity_plan_replays_to_identical_weights_and_masks(tmp_path, tiny_model_dir, text_file, monkeypatch):
    from lit_prune.callbacks import SparsityPruning

    cfg = _config(tmp_path, tiny_model_dir, text_file, callbacks=SPARSEGPT_OWL)
    (first,) = run_prune(["--config", cfg, "--output", str(tmp_path / "a")])
    assert first.changes_sparsity and first.sparsity["config"]["criterion"] == "sparsegpt"
    assert first.sparsity["calibration"]["sequences"] == 4  # the config's calibration_windows
    monkeypatch.setattr(SparsityPruning, "prune_all", lambda *a: pytest.fail("scored although --plan was given"))
    (replayed,) = run_prune(["--config", cfg, "--output", str(tmp_path / "b"), "--plan",
                             str(tmp_path / "a" / "pruning_plans.json")])
    assert replayed == first
    a, b = LlamaForCausalLM.from_pretrained(tmp_path / "a"), LlamaForCausalLM.from_pretrained(tmp_path / "b")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # SparseGPT's weight updates too, not only the zeros
    za, zb = _zeros(a), _zeros(b)
    assert za.keys() == zb.keys() and all(torch.equal(za[k], zb[k]) for k in za)
    dense = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    assert not all(torch.equal(p, q) for p, q in zip(dense.state_dict().values(), b.state_dict().values()))
    assert json.loads((tmp_path / "b" / "pruning_plans.json").read_text()) == [first.to_dict()]


def test_a_sparsity_plan_on_other_calibration_is_refused(tmp_path, tiny_model_dir, text_file):
    wanda = [{"class_path": "lit_prune.callbacks.SparsityPruning",
              "init_args": {"criterion": "wanda", "sparsity": 0.5, "verbose": 0}}]
    run_prune(["--config", _config(tmp_path, tiny_model_dir, text_file, callbacks=wanda), "--output",
               str(tmp_path / "a")])
    other = _config(tmp_path, tiny_model_dir, text_file, callbacks=[], name="other.yaml", calibration_seed=1)
    with pytest.raises(CLIError, match=r"^--plan: plan \[0\] \(sparsity:wanda\) cannot be replayed: The calibration "
                       r"differs from the one the sparsity plan was made on: got .* the plan records .*Replay it on "
                       r"the same calibration windows .*Nothing was modified"):
        run_prune(["--config", other, "--output", str(tmp_path / "b"), "--plan", str(tmp_path / "a")])
    assert not (tmp_path / "b").exists()


AMP_LSQ = [{"class_path": "lit_prune.callbacks.WidthPruning",
            "init_args": {"criterion": "amp", "amount": 0.2, "reconstruct": "lsq", "verbose": 0}}]


def test_a_reconstruction_plan_replays_to_identical_weights(tmp_path, tiny_model_dir, text_file, monkeypatch):
    from lit_prune.callbacks import WidthPruning

    cfg = _config(tmp_path, tiny_model_dir, text_file, callbacks=AMP_LSQ)
    (first,) = run_prune(["--config", cfg, "--output", str(tmp_path / "a")])
    assert first.reconstruction is not None and first.reconstruction["calibration"]["sequences"] == 4
    monkeypatch.setattr(WidthPruning, "prune", lambda *a: pytest.fail("scored although --plan was given"))
    (replayed,) = run_prune(["--config", cfg, "--output", str(tmp_path / "b"), "--plan",
                             str(tmp_path / "a" / "pruning_plans.json")])
    assert replayed == first
    a, b = LlamaForCausalLM.from_pretrained(tmp_path / "a"), LlamaForCausalLM.from_pretrained(tmp_path / "b")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)  # the refit o/down weights too
