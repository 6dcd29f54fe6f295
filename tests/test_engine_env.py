"""What an engine replica puts in its engine processes' environment before they start."""
import os
from pathlib import Path

from pdserve.engine.config import load_config
from pdserve.engine.server import EngineServer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _env_after_set(monkeypatch, cfg) -> dict:
    for key in ("PDSERVE_CPU_NO_AMX", "PYTHONPATH", "PDSERVE_CORE_SET", "VLLM_CPU_OMP_THREADS_BIND",
                "VLLM_NIXL_SIDE_CHANNEL_PORT", "VLLM_NIXL_SIDE_CHANNEL_HOST", "VLLM_CPU_KVCACHE_SPACE",
                "PDSERVE_DIE_WITH_PARENT", "OMP_WAIT_POLICY", "VLLM_HOST_IP"):
        monkeypatch.delenv(key, raising=False)
    EngineServer(cfg, "decode", 0, host="10.77.0.4")._set_env()
    return dict(os.environ)


def test_cpu_engines_run_attention_without_amx_by_default(monkeypatch):
    env = _env_after_set(monkeypatch, load_config(CONFIGS / "cpu-pd.yaml"))
    assert env["PDSERVE_CPU_NO_AMX"] == "1"
    assert "child_guard" in env["PYTHONPATH"]  # where the switch is read


def test_amx_attention_can_be_turned_back_on(monkeypatch):
    cfg = load_config(CONFIGS / "cpu-pd.yaml")
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"cpu_amx_attention": True})})
    assert _env_after_set(monkeypatch, cfg)["PDSERVE_CPU_NO_AMX"] == "0"


def test_the_switch_hides_amx_from_vllms_isa_probe():
    import subprocess
    import sys

    guard = Path(__file__).resolve().parents[1] / "engine" / "child_guard"
    probe = "import torch; print(torch.cpu._is_amx_tile_supported())"
    out = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, PYTHONPATH=str(guard),
                         PDSERVE_CPU_NO_AMX="1"), capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_engines_use_the_replicas_advertised_address(monkeypatch):
    env = _env_after_set(monkeypatch, load_config(CONFIGS / "cpu-pd.yaml"))
    assert env["VLLM_HOST_IP"] == "10.77.0.4"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.77.0.4"
