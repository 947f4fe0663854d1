"""What ``lit-prune`` prints: help, --log-level, one-line config errors with close matches, exit codes, Ctrl-C."""

import logging
import sys
import warnings
from pathlib import Path

import pytest
import transformers
from conftest import tiny_cli_config

import lit_prune.module as module_mod
from lit_prune.callbacks import DepthPruning
from lit_prune.cli import COMMANDS, main, trainer_cli
from lit_prune.cli_errors import CLIError, summarize_parser_error
from lit_prune.cli_logging import cli_logging, pop_log_level


def _config(tmp_path, model_dir, text_file, callbacks=None, **data):
    if callbacks is None:
        callbacks = [{"class_path": "lit_prune.callbacks.DepthPruning",
                      "init_args": {"criterion": "bi", "num_layers": 1}}]
    return tiny_cli_config(tmp_path, model_dir, text_file, data={"calibration_windows": 4, **data},
                           trainer={"max_steps": 2, "callbacks": callbacks}, name="c.yaml")


def _fail(args, capsys):
    """Run main(args) expecting SystemExit: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err.splitlines()


def test_top_level_help_lists_every_subcommand(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("prune", "fit", "validate", "test", "eval", "report", "demo"):
        assert f"\n  {name} " in out, name
    assert set(COMMANDS) == {"prune", "fit", "validate", "test", "eval", "report", "demo"}
    assert "--log-level" in out


def test_prune_help_has_one_description(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lit-prune prune")
    assert "Prune without training: run the config's pruning callbacks" in out
    assert "Trainer subcommands" not in out and "--plan" in out and "--overwrite" in out


def test_unknown_command_suggests_the_closest(capsys):
    code, err = _fail(["prun"], capsys)
    assert code == 2
    assert err[0] == ("lit-prune: error: unknown command 'prun'; did you mean 'prune'?; choose one of: prune, fit, "
                      "validate, test, eval, report, demo")


def test_log_level_is_checked_and_taken_anywhere(capsys):
    assert pop_log_level(["prune", "--log-level", "debug", "--config", "x"]) == (["prune", "--config", "x"], "debug")
    assert pop_log_level(["--log-level=warning", "eval"]) == (["eval"], "warning")
    assert pop_log_level(["fit"]) == (["fit"], "info")
    code, err = _fail(["prune", "--log-level", "debgu"], capsys)
    assert code == 2
    assert err[0] == ("lit-prune prune: error: `--log-level` must be one of debug, info, warning, error, "
                      "got 'debgu'; did you mean 'debug'?")


def test_cli_logging_hides_third_party_info_and_progress_bars(capsys):
    import transformers.modeling_gguf_pytorch_utils as gguf

    before = gguf.tqdm
    with cli_logging("info"):
        logging.getLogger("lightning.pytorch.trainer").info("GPU available: False")
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
        logging.getLogger("lit_prune.something").info("lit-prune says hi")
        logging.getLogger("lit_prune.something").debug("lit-prune detail")
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert gguf.tqdm(range(3)).disable
    assert gguf.tqdm is before and transformers.utils.logging.is_progress_bar_enabled()
    err = capsys.readouterr().err
    assert "GPU available" not in err and "lit-prune detail" not in err
    assert "lit-prune says hi\n" in err
    assert "warning: a transformers warning\n" in err
    with cli_logging("debug"):
        logging.getLogger("lightning.pytorch.trainer").info("GPU available: False")
        logging.getLogger("lit_prune.something").debug("lit-prune detail")
        assert gguf.tqdm is before and transformers.utils.logging.is_progress_bar_enabled()
    err = capsys.readouterr().err
    assert "GPU available" in err and "DEBUG lit_prune.something: lit-prune detail" in err


def test_rank_zero_info_of_lit_prune_is_shown_and_lightnings_is_not(capsys):
    """Callbacks log through Lightning's ``rank_zero_info`` (logger ``lightning.pytorch...``): kept by their file."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    import lit_prune

    inside = str(Path(lit_prune.__file__).parent / "callbacks" / "fake.py")
    with cli_logging("info"):
        code = compile("rank_zero_info('shown: called from lit_prune')", inside, "exec")
        exec(code, {"rank_zero_info": rank_zero_info})
        rank_zero_info("hidden: called from a test file, i.e. not lit_prune")
    err = capsys.readouterr().err
    assert "shown: called from lit_prune" in err and "hidden" not in err


def test_prune_output_has_no_lightning_noise_and_no_argv_warning(tmp_path, tiny_model_dir, text_file, capsys,
                                                                  monkeypatch):
    cfg = _config(tmp_path, tiny_model_dir, text_file)
    args = ["prune", "--config", str(cfg), "--output", str(tmp_path / "out")]
    monkeypatch.setattr(sys, "argv", ["lit-prune", *args])  # as the console script sees it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(None)
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
    captured = capsys.readouterr()
    for noise in ("GPU available", "TPU available", "litlogger", "Seed set to"):
        assert noise not in captured.err
    assert captured.out.startswith("Pruned with depth:bi: params ")
    main([*args[:-1], str(tmp_path / "out2"), "--log-level", "debug"])
    assert "GPU available" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "extra", "expected"),
    [
        ({"critrion": "bi"}, [], "DepthPruning has no argument 'critrion'; did you mean 'criterion'?"),
        ({"criterion": "consensu"}, [], "`criterion` must be one of 'bi', "),
        ({}, ["--trainer.callbacks.init_args.criterion", "consensu"], "got 'consensu'; did you mean 'consensus'?"),
        ({}, ["--trainer.callbacks.init_args.num_layer", "2"], "no argument 'num_layer'; did you mean 'num_layers'?"),
        ({}, ["--trainer.max_stepz", "3"], "unrecognized argument '--trainer.max_stepz'; did you mean "
                                           "'--trainer.max_steps'?"),
        ({}, ["--model.dtype", "flaot32"], "model.dtype: must be one of 'float32', 'bfloat16', 'float16', got "
                                           "'flaot32'; did you mean 'float32'?"),
    ],
)
def test_bad_config_prints_the_message_first(tmp_path, tiny_model_dir, text_file, capsys, edit, extra, expected):
    init_args = {"num_layers": 1, **edit} if "critrion" in edit else {"criterion": "bi", "num_layers": 1, **edit}
    cfg = _config(tmp_path, tiny_model_dir, text_file,
                  callbacks=[{"class_path": "lit_prune.callbacks.DepthPruning", "init_args": init_args}])
    code, err = _fail(["prune", "--config", str(cfg), "--output", str(tmp_path / "o"), *extra], capsys)
    assert code == 2
    assert err[0].startswith("lit-prune prune: error: ") and expected in err[0], err[0]
    assert err[1] == "See `lit-prune prune --help` for the options; `--log-level debug` shows more."
    assert len(err) == 2  # no usage, no parser dump
    assert not (tmp_path / "o").exists()


def test_bad_config_at_debug_adds_the_parsers_full_message(tmp_path, tiny_model_dir, text_file, capsys):
    cfg = _config(tmp_path, tiny_model_dir, text_file)
    code, err = _fail(["prune", "--config", str(cfg), "--trainer.callbacks.init_args.criterion", "consensu",
                       "--log-level", "debug"], capsys)
    assert code == 2 and "did you mean 'consensus'" in err[0]
    assert any("Does not validate against any of the Union subtypes" in line for line in err[2:])


def test_override_of_the_last_callback_is_explained(tmp_path, tiny_model_dir, text_file, capsys):
    cfg = _config(tmp_path, tiny_model_dir, text_file, callbacks=[
        {"class_path": "lit_prune.callbacks.DepthPruning", "init_args": {"num_layers": 1}},
        {"class_path": "lit_prune.callbacks.CKALoRA", "init_args": {"ratio": 0.5}},
    ])
    code, err = _fail(["fit", "--config", str(cfg), "--trainer.callbacks.init_args.criterion", "bi"], capsys)
    assert code == 2
    assert err[0] == (
        "lit-prune fit: error: trainer.callbacks: CKALoRA has no argument 'criterion' (`--trainer.callbacks."
        "init_args.NAME VALUE` sets NAME on the last callback of the list; change an earlier one in the YAML)"
    )


@pytest.mark.parametrize("flag", ["--trainer.callbacks.init_args.criterion", "--trainer.callbacks.criterion"])
def test_callback_arguments_can_be_overridden_from_the_command_line(tmp_path, tiny_model_dir, text_file, flag):
    cli = trainer_cli(["--config", str(_config(tmp_path, tiny_model_dir, text_file)), flag, "angular",
                       "--trainer.callbacks.init_args.num_layers", "2"], run=False)
    (callback,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, DepthPruning)]
    assert callback.criterion == "angular" and callback.num_layers == 2


def test_library_validation_error_is_one_line_without_traceback(tmp_path, tiny_model_dir, text_file, capsys):
    cfg = _config(tmp_path, tiny_model_dir, text_file, callbacks=[
        {"class_path": "lit_prune.callbacks.DepthPruning", "init_args": {"amount": 1.5}}])
    code, err = _fail(["prune", "--config", str(cfg)], capsys)
    assert code == 2
    assert err[0].startswith("lit-prune prune: error: ") and "`amount`" in err[0] and "1.5" in err[0]
    assert not any("Traceback" in line for line in err)
    code, err = _fail(["prune", "--config", str(cfg), "--log-level", "debug"], capsys)
    assert code == 2 and any("Traceback" in line for line in err)


def test_runtime_error_exits_1(tmp_path, tiny_model_dir, text_file, capsys, monkeypatch):
    def boom(self, pl_module, calibration):
        raise ValueError("scores are NaN")

    monkeypatch.setattr(DepthPruning, "prune_all", boom)
    out = tmp_path / "o"
    code, err = _fail(["prune", "--config", str(_config(tmp_path, tiny_model_dir, text_file)), "--output",
                       str(out)], capsys)
    assert (code, err[-1]) == (1, "lit-prune prune: error: scores are NaN")  # after the progress lines
    assert not any("Traceback" in line for line in err)
    assert not out.exists()


def test_ctrl_c_prints_one_line_and_leaves_nothing(tmp_path, tiny_model_dir, text_file, capsys, monkeypatch):
    import lit_prune.cli as cli_mod

    def interrupted_save(model, path, **kwargs):
        (path / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "save_pretrained", interrupted_save)
    out = tmp_path / "o"
    code, err = _fail(["prune", "--config", str(_config(tmp_path, tiny_model_dir, text_file)), "--output",
                       str(out)], capsys)
    assert (code, err[-1]) == (130, "lit-prune prune: interrupted; nothing was saved")
    assert not any("Traceback" in line or "KeyboardInterrupt" in line for line in err)
    assert not out.exists()


def test_ctrl_c_while_loading_exits_130(tmp_path, tiny_model_dir, text_file, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module_mod, "load_model", interrupted)
    code, err = _fail(["validate", "--config", str(_config(tmp_path, tiny_model_dir, text_file))], capsys)
    assert (code, err[-1]) == (130, "lit-prune validate: interrupted")
    assert not any("Traceback" in line for line in err)


def test_summarize_falls_back_to_the_first_line():
    assert summarize_parser_error("something odd\n  more detail") == "something odd"
    assert summarize_parser_error('Parser key "data":\n  - Problem with given class_path '
                                  "'lit_prune.datamodules.TextDataModule':\n      module 'lit_prune.datamodules' "
                                  "has no attribute 'TextDataModul'").endswith("did you mean 'TextDataModule'?")


def test_cli_error_carries_its_code():
    err = CLIError("bad", code=1, detail="more")
    assert (str(err), err.code, err.detail) == ("bad", 1, "more")
