"""The admin key: config rules and the chaos CLI's key resolution."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pdserve.router.config import DEV_ADMIN_KEY, resolve_admin_key
from pdserve.settings.cluster import load_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, host: str, admin: str) -> Path:
    text = (ROOT / "configs" / "cpu-pd.yaml").read_text()
    text = text.replace("  host: 127.0.0.1", f"  host: {host}")
    text = text.split("\nadmin:")[0] + "\n" + admin
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_cpu_configs_carry_the_loopback_dev_key():
    for name in ("cpu-pd.yaml", "cpu-pd-grpc.yaml", "cpu-monolithic.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.router.host == "127.0.0.1" and resolve_admin_key(cfg.admin) == DEV_ADMIN_KEY


def test_non_loopback_router_needs_its_own_key(tmp_path):
    with pytest.raises(ValidationError, match="not loopback"):
        load_config(_cfg(tmp_path, "0.0.0.0", f"admin:\n  key: {DEV_ADMIN_KEY}\n"))
    with pytest.raises(ValidationError, match="not loopback"):
        load_config(_cfg(tmp_path, "0.0.0.0", "admin: {}\n"))
    cfg = load_config(_cfg(tmp_path, "0.0.0.0", "admin:\n  key: a-long-production-key\n"))
    assert resolve_admin_key(cfg.admin) == "a-long-production-key"
    with pytest.raises(ValidationError, match="at least 12"):
        load_config(_cfg(tmp_path, "127.0.0.1", "admin:\n  key: short\n"))


def test_key_from_environment_fails_loudly_when_unset(tmp_path, monkeypatch):
    cfg = load_config(_cfg(tmp_path, "0.0.0.0", "admin:\n  key_env: TEST_PDSERVE_ADMIN\n"))
    monkeypatch.delenv("TEST_PDSERVE_ADMIN", raising=False)
    with pytest.raises(ValueError, match="TEST_PDSERVE_ADMIN"):
        resolve_admin_key(cfg.admin)
    monkeypatch.setenv("TEST_PDSERVE_ADMIN", "from-the-env-123")
    assert resolve_admin_key(cfg.admin) == "from-the-env-123"


def test_gpu_config_takes_its_key_from_the_environment():
    cfg = load_config(ROOT / "configs" / "gpu-pd.yaml")
    assert cfg.admin.key_env == "PDSERVE_ADMIN_KEY" and cfg.admin.key is None


def test_chaos_cli_uses_the_dev_key_only_for_loopback(monkeypatch, capsys):
    from pdserve.cluster.cli import main

    monkeypatch.delenv("PDSERVE_ADMIN_KEY", raising=False)
    assert main(["chaos", "--url", "http://10.1.2.3:8000", "kill-links"]) == 2
    assert "not loopback" in capsys.readouterr().err
    assert main(["chaos", "--url", "http://127.0.0.1:9", "kill-links"]) == 1  # nothing listens there
    assert "cannot reach" in capsys.readouterr().err
