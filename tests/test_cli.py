import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_cli_config, tiny_config
from transformers import LlamaForCausalLM

import lit_prune.module as module_mod
from lit_prune.cli import eval_parser, main, run_eval, run_prune, trainer_cli
from lit_prune.cli_errors import CLIError
from lit_prune.datamodules import TextDataModule
from lit_prune.eval import perplexity

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.fixture
def fake_loading(monkeypatch, tiny_tokenizer, tmp_path):
    """Shipped configs name the real model and shared data; use a tiny model and placeholder files instead."""
    for config in CONFIGS:
        for rel in re.findall(r"data://(\S+)", config.read_text()):
            (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / rel).write_text("placeholder text\n")
    monkeypatch.setenv("LIT_PRUNE_DATA_DIR", str(tmp_path / "data"))

    def fake_model(name, gguf_file=None, dtype="float32", **kw):
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_config())

    monkeypatch.setattr(module_mod, "load_model", fake_model)
    monkeypatch.setattr(module_mod, "load_tokenizer", lambda name, gguf_file=None: tiny_tokenizer)


def test_configs_exist():
    assert any(p.name == "smollm2.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_instantiates(path, fake_loading):
    cli = trainer_cli(["--config", str(path)], run=False)
    assert cli.model.model.config.model_type == "llama"
    assert cli.datamodule is not None
    cfg = eval_parser().parse_args(["--config", str(path)])
    assert cfg.model.model == yaml.safe_load(path.read_text())["model"]["model"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_print_config_shows_every_callback_default(path, fake_loading, capsys):
    """Callbacks forward their shared tail (`at_epoch`, `verbose`, ...) as **kwargs: the CLI still lists each one."""
    import dataclasses

    from lit_prune.recovery.lora import LoRASpec
    from lit_prune.sparse.config import SparsityConfig

    with pytest.raises(SystemExit):
        trainer_cli(["fit", "--config", str(path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    shipped = yaml.safe_load(path.read_text())["trainer"].get("callbacks") or []
    given = {c["class_path"]: c.get("init_args", {}) for c in shipped}
    for callback in printed["trainer"]["callbacks"] or []:
        name, args = callback["class_path"].rsplit(".", 1)[-1], callback["init_args"]
        assert {k: args[k] for k in given[callback["class_path"]]} == given[callback["class_path"]]  # YAML kept
        if name in ("DepthPruning", "WidthPruning", "SparsityPruning", "MixtureOfPruners"):
            assert {"at_epoch", "calibration", "calibration_batches", "verbose"} <= set(args), name
            assert args["calibration_batches"] is None and (args["verbose"] == 1 or "verbose" in given), name
        if name == "SparsityPruning":
            for field in dataclasses.fields(SparsityConfig):
                key = "trim" if field.name == "trim_rows" else field.name
                if key not in given[callback["class_path"]]:
                    assert args[key] == field.default, key
        if name == "CKALoRA":
            assert "layers" not in args and {"teacher", "merge_at_end", "save_adapter", "verbose"} <= set(args)
            for field in dataclasses.fields(LoRASpec):
                if field.name != "layers" and field.name not in given[callback["class_path"]]:
                    assert args[field.name] == field.default, field.name


def test_smollm2_config_encodes_the_cpu_protocol(fake_loading):
    from lit_prune.presets import CPU_PROTOCOL

    cli = trainer_cli(["--config", str(Path(__file__).resolve().parents[1] / "configs/smollm2.yaml")], run=False)
    dm = cli.datamodule
    assert isinstance(dm, TextDataModule)
    assert cli.model.hparams["model"] == CPU_PROTOCOL.model
    assert dm.val_path.endswith(CPU_PROTOCOL.eval_file)
    assert dm.calibration_path.endswith(CPU_PROTOCOL.calibration_file)
    assert (dm.seq_len, dm.max_val_windows) == (CPU_PROTOCOL.seq_len, CPU_PROTOCOL.eval_windows)
    assert (dm.calibration_windows, dm.calibration_seed) == (
        CPU_PROTOCOL.calibration_windows, CPU_PROTOCOL.calibration_seed)


def _tiny_yaml(tmp_path, model_dir, text_file, **data):
    return tiny_cli_config(tmp_path, model_dir, text_file, data={"max_val_windows": 8, **data},
                           trainer={"enable_progress_bar": False, "max_steps": 2})


def _reference_ppl(model_dir, text_file, tmp_path):
    dm = TextDataModule(tokenizer=str(model_dir), val_path=str(text_file), seq_len=16, max_val_windows=8,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup("validate")
    model = LlamaForCausalLM.from_pretrained(model_dir)
    return perplexity(model, dm.windows("val"), progress=False)


def test_validate_subcommand_agrees_with_perplexity(tmp_path, tiny_model_dir, text_file):
    cli = trainer_cli(["validate", "--config", str(_tiny_yaml(tmp_path, tiny_model_dir, text_file))])
    got = float(cli.trainer.callback_metrics["val_ppl"])
    assert got == pytest.approx(_reference_ppl(tiny_model_dir, text_file, tmp_path), rel=1e-4)


def test_fit_subcommand_runs(tmp_path, tiny_model_dir, text_file):
    cli = trainer_cli(["fit", "--config", str(_tiny_yaml(tmp_path, tiny_model_dir, text_file))])
    assert cli.trainer.global_step == 2


def test_eval_prints_table_and_writes_json(tmp_path, tiny_model_dir, text_file, capsys):
    out = tmp_path / "eval.json"
    main([
        "eval", "--config", str(_tiny_yaml(tmp_path, tiny_model_dir, text_file)),
        "--eval.prompt_len", "8", "--eval.new_tokens", "2", "--eval.repeats", "1",
        "--eval.batch_sizes", "[1, 2]", "--eval.progress", "false", "--eval.output", str(out),
    ])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    expected = _reference_ppl(tiny_model_dir, text_file, tmp_path)
    # eval scores batches of 3 (the data config), the reference batches of 4: float32 NLL sums differ by ~1 ulp of
    # the mean NLL, which is ppl's relative error; 1e-5 is ~20 ulps (see PPL_REL in tests/eval/test_perplexity.py)
    assert saved["ppl"]["ppl"] == pytest.approx(expected, rel=1e-5)
    assert f"{saved['ppl']['ppl']:.3f}" in printed  # its own value: the reference may differ in the 4th decimal
    assert "prefill latency, batch 2" in printed and "decode, batch 1" in printed
    assert "8 windows of 16 tokens" in printed
    reloaded = LlamaForCausalLM.from_pretrained(tiny_model_dir)
    assert saved["params"]["total"] == sum(p.numel() for p in reloaded.parameters())


def test_eval_without_text_says_how_to_point_it(tmp_path, tiny_model_dir, text_file, caplog):
    cfg = _tiny_yaml(tmp_path, tiny_model_dir, text_file, val_path=str(tmp_path / "missing" / "wiki.test.raw"))
    with caplog.at_level(logging.WARNING, logger="lit_prune.cli_eval"):
        summary = run_eval(["--config", str(cfg), "--eval.latency", "false"])
    assert summary.ppl is None
    (record,) = [r for r in caplog.records if r.name == "lit_prune.cli_eval"]
    assert "missing/wiki.test.raw' does not exist" in record.getMessage()
    assert "--data.val_path" in record.getMessage()


def test_eval_warns_that_instruction_data_is_not_scored(tmp_path, tiny_model_dir, caplog):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 4))
    args = ["--model.model", str(tiny_model_dir), "--data", "lit_prune.datamodules.InstructionDataModule",
            "--data.path", str(alpaca), "--eval.latency", "false"]
    with caplog.at_level(logging.WARNING, logger="lit_prune.cli_eval"):
        summary = run_eval(args)
    assert summary.ppl is None
    assert "InstructionDataModule is skipped" in caplog.text


def test_unknown_command():
    with pytest.raises(SystemExit, match="unknown command 'prun'; did you mean 'prune'.; choose one of: prune, fit, "):
        main(["prun"])
    with pytest.raises(SystemExit, match="unknown command 'predict'; choose one of") as exc:
        main(["predict"])
    assert exc.value.code == 2


def test_optimizer_and_scheduler_from_yaml(tmp_path, tiny_model_dir, text_file):
    path = _tiny_yaml(tmp_path, tiny_model_dir, text_file)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["optimizer"] = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05, "momentum": 0.9}}
    cfg["model"]["scheduler"] = {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 3}}
    path.write_text(yaml.safe_dump(cfg))
    cli = trainer_cli(["--config", str(path)], run=False)
    opts = cli.model.configure_optimizers()
    optimizer = opts["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == 0.05
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert isinstance(opts["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert opts["lr_scheduler"]["interval"] == "step"


def test_prune_subcommand_saves_a_reloadable_model(tmp_path, tiny_model_dir, text_file):
    path = _tiny_yaml(tmp_path, tiny_model_dir, text_file, calibration_windows=4)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lit_prune.callbacks.DepthPruning", "init_args": {"criterion": "bi", "num_layers": 1}}
    ]
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "pruned"
    (plan,) = run_prune(["--config", str(path), "--output", str(out)])
    reloaded = LlamaForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 3
    assert plan.params_after == sum(p.numel() for p in reloaded.parameters())
    saved = json.loads((out / "pruning_plans.json").read_text())
    assert saved[0]["drop_layers"] == list(plan.drop_layers)
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_prune_subcommand_needs_a_pruning_callback(tmp_path, tiny_model_dir, text_file):
    with pytest.raises(CLIError, match="no pruning callback under `trainer.callbacks`"):
        run_prune(["--config", str(_tiny_yaml(tmp_path, tiny_model_dir, text_file))])


@pytest.mark.parametrize(
    ("callback", "init_args"),
    [
        ("WidthPruning", {"criterion": "amp", "amount": 0.2, "allocation": "global"}),
        ("MixtureOfPruners", {"target": 0.2, "proxy": "ppl"}),
    ],
)
def test_prune_subcommand_with_width_and_mop(tmp_path, tiny_model_dir, text_file, callback, init_args):
    from lit_prune import load_pretrained
    from lit_prune.arch import adapter_for

    path = _tiny_yaml(tmp_path, tiny_model_dir, text_file, calibration_windows=4)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"] = [{"class_path": f"lit_prune.callbacks.{callback}", "init_args": init_args}]
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "pruned"
    plans = run_prune(["--config", str(path), "--output", str(out)])
    reloaded = load_pretrained(out)
    assert plans[-1].params_after == adapter_for(reloaded).total_params(reloaded)
    assert len(json.loads((out / "pruning_plans.json").read_text())) == len(plans) >= 1


def test_demo_runs_mop_and_prints_dense_vs_pruned(fake_loading, tmp_path):
    from lit_prune import demo

    corpus = " ".join(f"word{i % 37} text{i % 11}." for i in range(4000))
    for name in ("wiki.test.raw", "wiki.valid.raw"):
        (tmp_path / "data" / "wikitext2" / name).write_text(corpus)
    table = demo.run_demo(["--target", "0.2", "--holdout", "2", "--rounds", "1", "--output", str(tmp_path / "demo")])
    assert "| | dense | MoP 20% |" in table and "MoP path" in table and "perplexity" in table
    assert (tmp_path / "demo" / "config.json").is_file()


def test_mop_recover_config_prunes_then_recovers_in_one_fit(tmp_path, tiny_model_dir):
    from lit_prune import load_pretrained
    from lit_prune.callbacks import CKALoRA, MixtureOfPruners

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/mop_recover.yaml").read_text())
    words = ["fox", "dog", "heads", "blocks", "lora", "cka", "prune", "merge"]
    records = [{"instruction": f"Say {w} twice.", "input": "", "output": f"{w} {w}."} for w in words * 3]
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps(records))
    cfg["model"] = {"model": str(tiny_model_dir)}
    cfg["data"]["init_args"].update(path=str(alpaca), seq_len=512, val_fraction=0.1)
    cfg["trainer"].update(accelerator="cpu", max_steps=3, val_check_interval=1.0, limit_val_batches=1, logger=False,
                          enable_progress_bar=False, default_root_dir=str(tmp_path / "run"))
    path = tmp_path / "mop_recover.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = trainer_cli(["fit", "--config", str(path)])
    mop, cka = cli.trainer.callbacks[0], cli.trainer.callbacks[1]
    assert isinstance(mop, MixtureOfPruners) and mop.finished
    assert isinstance(cka, CKALoRA) and len(cka.attachments) == 1
    blocks = cli.model.model.config.num_hidden_layers
    assert len(cka.attachments[0]["layers"]) == blocks // 2  # floor(0.5 * L) of the pruned model
    assert cli.trainer.global_step == 3
    merged = load_pretrained(tmp_path / "run" / "lora-merged")
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in cli.model.model.parameters())
    x = torch.randint(4, 200, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, cli.model.model.eval()(input_ids=x).logits)
    assert (tmp_path / "run" / "lora-adapter" / "adapter_config.json").is_file()


def test_prune_subcommand_skips_recovery_callbacks_with_a_warning(tmp_path, tiny_model_dir, text_file, caplog):
    from lit_prune import load_pretrained

    path = _tiny_yaml(tmp_path, tiny_model_dir, text_file, calibration_windows=4)
    cfg = yaml.safe_load(path.read_text())
    cfg["trainer"]["callbacks"] = [
        {"class_path": "lit_prune.callbacks.DepthPruning", "init_args": {"num_layers": 1}},
        {"class_path": "lit_prune.callbacks.CKALoRA", "init_args": {"ratio": 0.5}},
    ]
    path.write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.WARNING, logger="lit_prune.cli_eval"):
        plans = run_prune(["--config", str(path), "--output", str(tmp_path / "pruned")])
    assert "['CKALoRA'] act during training and are skipped here" in caplog.text
    reloaded = load_pretrained(tmp_path / "pruned")
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    assert len(plans) == 1 and reloaded.config.num_hidden_layers == 3
