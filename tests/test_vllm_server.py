"""vLLM's own server for the fidelity test and the serving-cost bench (bench/vllm_server.py) gets
the engine settings pdserve's engines get from the same config (no server is started here)."""
from __future__ import annotations

import time
from pathlib import Path

from pdserve.bench.vllm_server import server_command, server_env
from pdserve.settings.cluster import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _cfg():
    cfg = load_config(CONFIGS / "cpu-pd.yaml")
    engine = cfg.engine.model_copy(update={"tool_call_parser": "pythonic", "enable_prefix_caching": False,
                                           "engine_kwargs": {"max_logprobs": 7}})
    return cfg.model_copy(update={"engine": engine})


def test_the_command_line_carries_the_engines_settings_as_vllm_reads_it():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cfg = _cfg()
    cmd = server_command(cfg, port=8123)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
    m, e = cfg.model, cfg.engine
    assert (args.served_model_name, args.seed, args.dtype, args.max_model_len, args.block_size, args.load_format) == \
        ([m.served_name], m.seed, m.dtype, m.max_model_len, m.block_size, m.load_format)
    assert (args.max_num_seqs, args.scheduling_policy, args.enforce_eager, args.enable_prefix_caching) == \
        (e.max_num_seqs, e.scheduling_policy, True, False)
    assert args.tool_call_parser == "pythonic" and args.enable_auto_tool_choice and args.enable_prompt_tokens_details
    assert args.max_logprobs == 7 and args.port == 8123 and args.model == args.tokenizer


def test_the_engine_runs_on_the_given_core_with_the_configs_kv_cache_and_attention():
    cfg = _cfg()
    env = server_env(cfg, core=1)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == str(cfg.engine.cpu_kv_cache_gib)
    assert env["PDSERVE_CPU_NO_AMX"] == "1" and "child_guard" in env["PYTHONPATH"]
    assert "PDSERVE_CPU_NO_AMX" not in server_env(cfg, core=1, pdserve_env=False)


def test_a_confined_server_runs_every_process_on_the_core_as_a_pdserve_replica_does():
    cfg = _cfg()
    assert server_env(cfg, core=1, confined=True)["PDSERVE_CORE_SET"] == "1"
    assert "PDSERVE_CORE_SET" not in server_env(cfg, core=1)  # only the engine's compute is bound
    assert "PDSERVE_CORE_SET" not in server_env(cfg, core=1, pdserve_env=False, confined=True)  # no guard to apply it


def test_engine_only_placement_pins_every_process_below_the_server():
    import os
    import signal
    import subprocess

    from pdserve.bench.vllm_server import descendants, pin_process_tree

    server = subprocess.Popen(["bash", "-c", "sleep 30 & (sleep 30 & wait) & wait"], start_new_session=True)
    try:
        for _ in range(100):  # until bash has started its three sleeps' processes
            below = descendants(server.pid)
            if len(below) >= 3:
                break
            time.sleep(0.05)
        assert server.pid not in below and len(below) >= 3
        assert pin_process_tree(below, {0}) >= len(below)
        assert all(os.sched_getaffinity(p) == {0} for p in below)
        assert os.sched_getaffinity(server.pid) == os.sched_getaffinity(0)  # the server's own process stays free
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
