"""Model references: how they become from_pretrained arguments, and how bad ones fail at once, before weights."""

from __future__ import annotations

import http.server
import json
import re
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import torch
from transformers import LlamaForCausalLM

from lit_prune import CausalLMModule, UnsupportedModelError, load_pretrained
from lit_prune.loading import gguf_architecture, hub_access, load_model, model_from_config, resolve_model_source
from lit_prune.presets import resolve_builtin


def test_resolve_model_source_gguf(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model_source(str(gguf)) == (str(tmp_path), "model.Q8_0.gguf")
    assert resolve_model_source(str(tmp_path), "model.Q8_0.gguf") == (str(tmp_path), "model.Q8_0.gguf")
    assert resolve_model_source("org/some-model") == ("org/some-model", None)  # a hub id is kept as is


def test_resolve_model_source_misconfiguration(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"GGUF file 'missing\.gguf' not found in '.*'"):
        resolve_model_source(str(tmp_path), gguf_file="missing.gguf")
    with pytest.raises(FileNotFoundError, match=r"GGUF file '.*nope\.gguf' does not exist"):
        resolve_model_source(str(tmp_path / "nope.gguf"))


# --- references that do not exist: one line, at once, before anything is downloaded or built ------------------------
def _loaders() -> dict[str, Callable[[str], object]]:
    return {
        "load_model": load_model,
        "load_pretrained": load_pretrained,
        "CausalLMModule": lambda ref: CausalLMModule(model=ref),
    }


LOADERS = sorted(_loaders())


@pytest.fixture
def no_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_local_paths_are_named(loader: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load = _loaders()[loader]
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "x" / "nonexistent")
    with pytest.raises(FileNotFoundError, match=rf"^Model folder '{re.escape(missing)}' does not exist; give an"):
        load(missing)
    for relative in ("./foo", "../bar", "a/b/c"):
        resolved = re.escape(str((tmp_path / relative).resolve()))
        with pytest.raises(FileNotFoundError, match=rf"^Model folder '{re.escape(relative)}' does not exist "
                                                    rf"\(resolved: {resolved}\);.*Hugging Face Hub id \('org/name'\)"):
            load(relative)
    with pytest.raises(FileNotFoundError, match=r"^GGUF file '.*nope\.gguf' does not exist"):
        load(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("loader", LOADERS)
def test_hub_id_in_offline_mode_is_refused_in_one_line(
    loader: str, var: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_offline_env: None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(var, "1")
    for name in ("org/name", "nonexistent"):
        with pytest.raises(FileNotFoundError) as err:
            _loaders()[loader](name)
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"'{name}' is not an existing folder ({tmp_path / name}), so it was taken as a "
                                  "Hugging Face Hub id, but offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)")
        assert message.endswith("give a local folder, a .gguf file or a built-in model (builtin:smollm2-135m-instruct)")


def _refused_port() -> int:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("loader", LOADERS)
def test_hub_id_with_unreachable_hub_is_refused(
    loader: str, monkeypatch: pytest.MonkeyPatch, no_offline_env: None
) -> None:
    endpoint = f"http://127.0.0.1:{_refused_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    expected = rf"Hub id, but the hub \({re.escape(endpoint)}\) is unreachable \(\w+\) and it is not in the local cache"
    with pytest.raises(FileNotFoundError, match=expected):
        _loaders()[loader]("org/name")


def test_hub_access_lets_transformers_download_when_the_hub_answers(
    monkeypatch: pytest.MonkeyPatch, no_offline_env: None
) -> None:
    class Ok(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert hub_access("org/name") == {}  # no local_files_only: from_pretrained goes to the hub as usual
    finally:
        server.shutdown()
        server.server_close()


def _fake_hub_cache(cache: Path, repo: str, model: LlamaForCausalLM) -> None:
    """The Hugging Face cache layout for ``repo`` at revision main, holding ``model``."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    model.save_pretrained(root / "snapshots" / commit)


def test_offline_hub_id_loads_from_the_cache(
    tmp_path: Path, tiny_model: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch, no_offline_env: None
) -> None:
    _fake_hub_cache(tmp_path / "cache", "org/tiny", tiny_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ids = torch.arange(4, 12)[None]
    for load in (load_model, load_pretrained):
        model = load("org/tiny", cache_dir=str(tmp_path / "cache"))
        torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="`local_files_only=True` was given and it is not in the local cache"):
        load_model("org/other", cache_dir=str(tmp_path / "cache"), local_files_only=True)


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"'.*config\.json' is a file but not a \.gguf file; give the folder"):
        load_model(str(tmp_path / "config.json"))


# --- unsupported families: refused from the config or the GGUF header, before weights ----------------------------
def _gguf_header(path: Path, kvs: list[tuple[str, int, bytes]]) -> Path:
    """A GGUF v3 file with no tensors and the given (key, value type, encoded value) pairs."""

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    body = b"".join(string(key) + struct.pack("<I", vtype) + value for key, vtype, value in kvs)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + body)
    return path


def _gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def test_gguf_architecture_reads_the_header_only(tmp_path: Path) -> None:
    tokens = struct.pack("<IQ", 8, 3) + b"".join(_gguf_string(t) for t in ("<s>", "a", "bc"))  # array of strings
    floats = struct.pack("<IQ", 6, 2) + struct.pack("<ff", 0.5, 1.5)  # array of float32
    path = _gguf_header(tmp_path / "m.gguf", [
        ("tokenizer.ggml.tokens", 9, tokens),
        ("some.scores", 9, floats),
        ("general.alignment", 4, struct.pack("<I", 32)),
        ("general.name", 8, _gguf_string("tiny")),
        ("general.architecture", 8, _gguf_string("qwen3")),
    ])
    assert gguf_architecture(path) == "qwen3"
    assert gguf_architecture(_gguf_header(tmp_path / "none.gguf", [("general.name", 8, _gguf_string("x"))])) is None
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")  # truncated
    assert gguf_architecture(tmp_path / "bad.gguf") is None
    (tmp_path / "text.gguf").write_text("not a gguf file")
    assert gguf_architecture(tmp_path / "text.gguf") is None
    try:
        folder, name = resolve_builtin("builtin:smollm2-135m-instruct")
    except FileNotFoundError:
        return
    assert gguf_architecture(Path(folder) / name) == "llama"


@pytest.mark.parametrize("loader", ["load_model", "CausalLMModule"])
def test_unsupported_family_is_refused_before_weights(loader: str, tmp_path: Path) -> None:
    load = _loaders()[loader]
    folder = tmp_path / "mamba"
    folder.mkdir()  # config.json only: reaching for the weights would fail differently
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 64}))
    with pytest.raises(UnsupportedModelError, match=r"model_type='mamba' \(config\.json of .*mamba\); "
                                                    r"supported: \['gemma3_text', 'llama', 'mistral', 'phi'"):
        load(str(folder))
    gguf = _gguf_header(tmp_path / "mamba.gguf", [("general.architecture", 8, _gguf_string("mamba"))])
    with pytest.raises(UnsupportedModelError, match=r"model_type='mamba' \(GGUF architecture 'mamba' of "
                                                    r"mamba\.gguf\); supported: \['gemma3_text'"):
        load(str(gguf))


def test_unsupported_family_from_a_config_or_object_is_refused() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    with pytest.raises(UnsupportedModelError, match=r"model_type='gpt2' \(GPT2Config\); supported"):
        model_from_config(cfg.to_dict())
    with pytest.raises(UnsupportedModelError, match=r"model_type='gpt2' \(GPT2Config\); supported"):
        CausalLMModule(config=cfg)
    with pytest.raises(UnsupportedModelError, match=r"model_type='gpt2' \(GPT2LMHeadModel\); supported"):
        CausalLMModule(model=GPT2LMHeadModel(cfg))
