"""vLLM's own OpenAI server for a pdserve config: the baseline pdserve is compared against.

``VllmServer(cfg, core=0).start()`` runs ``python -m vllm.entrypoints.openai.api_server`` as a
subprocess with the engine settings a pdserve engine of ``cfg`` gets (engine/server.py): the
same model folder (a built-in model is built as pdserve builds it), served model name, dtype,
max_model_len, block size, seed, scheduler and cache settings, ``engine.engine_kwargs``, and
the same serving-layer options (chat template, tool-call parser, reasoning parser, prompt
token details). On CPU its engine runs on the given core (VLLM_CPU_OMP_THREADS_BIND) with
``engine.cpu_kv_cache_gib`` of KV cache.

``pdserve_env`` (default on) also gives it the engine environment pdserve's engines run in
(engine/child_guard/sitecustomize.py): AMX attention off unless ``engine.cpu_amx_attention``
(the attention kernel changes the numbers, so outputs would not match token for token
otherwise), vLLM's queue readers not spinning (on a small machine their busy loop takes a
core from everything else; outputs are unchanged), and the server dying with its parent.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from pdserve.bench.ports import free_port
from pdserve.engine.server import serving_args
from pdserve.engine.tiny_model import resolve_model

if TYPE_CHECKING:
    from pdserve.settings.cluster import ClusterConfig

GUARD_DIR = Path(__file__).resolve().parents[1] / "engine" / "child_guard"


def _flag(name: str, value) -> list[str]:
    """An engine argument as vLLM's command line takes it."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else ["--no-" + name.replace("_", "-")]
    if isinstance(value, (dict, list)):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def server_command(cfg: "ClusterConfig", port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of vLLM's own server with the engine settings of ``cfg``'s engines."""
    model_path = resolve_model(cfg.model.path)
    m, e = cfg.model, cfg.engine
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *serving_args(cfg, model_path),
            "--host", host, "--port", str(port), "--tokenizer", model_path,
            "--load-format", m.load_format, "--dtype", m.dtype, "--max-model-len", str(m.max_model_len),
            "--block-size", str(m.block_size), "--seed", str(m.seed), "--max-num-seqs", str(e.max_num_seqs),
            "--scheduling-policy", e.scheduling_policy, "--disable-uvicorn-access-log"]
    args += _flag("enforce_eager", e.enforce_eager) if e.enforce_eager else []
    args += _flag("enable_prefix_caching", e.enable_prefix_caching)
    if e.max_num_batched_tokens is not None:
        args += _flag("max_num_batched_tokens", e.max_num_batched_tokens)
    if e.kv_cache_blocks is not None:
        args += _flag("num_gpu_blocks_override", e.kv_cache_blocks)
    if cfg.device == "gpu":
        args += _flag("gpu_memory_utilization", e.gpu_memory_utilization)
    for name, value in e.engine_kwargs.items():
        args += _flag(name, value)
    return args


def server_env(cfg: "ClusterConfig", core: Optional[int], pdserve_env: bool = True,
               confined: bool = False) -> dict[str, str]:
    """The server's environment. ``confined`` (with ``pdserve_env`` and a ``core``): every process
    of the server, its HTTP front and engine frontend too, runs on ``core``, as every process of a
    pdserve engine replica runs on its core set; otherwise only the engine's compute is bound."""
    env = dict(os.environ)
    env.pop("PDSERVE_CORE_SET", None)
    if cfg.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.engine.cpu_kv_cache_gib)
        if core is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if pdserve_env:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(GUARD_DIR), env.get("PYTHONPATH")) if p)
        env["PDSERVE_DIE_WITH_PARENT"] = "1"
        env["PDSERVE_MQ_NO_SPIN"] = "1"
        if cfg.device == "cpu":
            env["PDSERVE_CPU_NO_AMX"] = "0" if cfg.engine.cpu_amx_attention else "1"
        if confined and core is not None:
            env["PDSERVE_CORE_SET"] = str(core)
    return env


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pin_process_tree(pids: list[int], cores: set[int]) -> int:
    """Every thread of ``pids`` onto ``cores``; returns how many threads were moved."""
    moved = 0
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
                moved += 1
            except OSError:
                pass
    return moved


class VllmServer:
    """vLLM's own OpenAI server as a subprocess; ``with VllmServer(cfg) as s: s.url``.

    ``engine_only`` (with a ``core``): once the server is ready, every process below the server's
    own (vLLM's engine core and its worker) runs on ``core``, all threads, while the server's
    process (HTTP front, engine frontend) runs free: the placement of a pdserve engine replica,
    whose own process floats and whose engine processes keep to its core set."""

    def __init__(self, cfg: "ClusterConfig", core: Optional[int] = 0, port: Optional[int] = None,
                 log_path: Optional[str] = None, pdserve_env: bool = True, confined: bool = False,
                 engine_only: bool = False) -> None:
        self.cfg = cfg
        self.confined = confined
        self.engine_only = engine_only
        self.core = core
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.pdserve_env = pdserve_env
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout_s: float = 600) -> "VllmServer":
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(server_command(self.cfg, self.port), env=server_env(
                self.cfg, self.core, self.pdserve_env, self.confined), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            if self.log_path:
                log.close()
        try:
            self._wait_ready(timeout_s)
            if self.engine_only and self.core is not None:
                engine = descendants(self.proc.pid)
                if not engine or not pin_process_tree(engine, {self.core}):
                    raise RuntimeError("vLLM's server has no engine processes to pin")
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                where = f"; its log: {self.log_path}" if self.log_path else ""
                raise RuntimeError(f"vLLM's server exited with {self.proc.returncode} before it was ready{where}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM's server at {self.url} was not ready within {timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 30 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
