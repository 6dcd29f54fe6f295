"""The built-in tiny model builds locally and its tokenizer and template behave."""
import json

import pytest

from pdserve.engine.tiny_model import resolve_model, write_tiny_model


def test_write_tiny_model(tmp_path):
    out = write_tiny_model(tmp_path / "tiny")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 64  # vLLM's CPU attention rejects 16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == cfg["vocab_size"]
    text = "Prefill builds the KV cache; decode streams tokens."
    assert tok.decode(tok.encode(text)) == text
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    assert tok.decode(ids).endswith("<|assistant|>\n")
    with pytest.raises(Exception, match="unknown role"):
        tok.apply_chat_template([{"role": "wizard", "content": "hi"}])


def test_builds_are_deterministic(tmp_path):
    a = write_tiny_model(tmp_path / "a")
    b = write_tiny_model(tmp_path / "b")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_resolve_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    path = resolve_model("builtin:tiny")
    assert path.startswith(str(tmp_path))
    assert resolve_model("builtin:tiny") == path  # cached
    assert resolve_model("/some/hf/dir") == "/some/hf/dir"
    with pytest.raises(ValueError, match="unknown built-in model"):
        resolve_model("builtin:huge")


def test_cli_model_tiny(tmp_path):
    from pdserve.cluster.cli import main

    assert main(["model", "tiny", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").exists()
