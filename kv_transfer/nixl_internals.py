"""Every reach pdserve makes into NIXL beyond its documented API, named in one place, and the
check that the installed NIXL is the one it was written against (with vLLM's:
kv_transfer/vllm_internals.py, whose ``check_versions()`` runs both where engines start).

The reaches:
  - ``nixlAgentConfig`` of NIXL's bindings (``nixl._bindings``, as vLLM loaded them: the module
    global ``nixlBind`` of ``vllm.distributed.nixl_utils``) is replaced by a subclass whose
    ``pthrDelay`` (the progress thread's poll delay, µs) has a floor: ``set_progress_thread_delay``.
    NIXL's Python agent (``nixl._api.nixl_agent``) sets ``pthrDelay = 0`` and the thread spins.
  - vLLM's NixlConnectorWorker privates around NIXL transfers (kv_transfer/nixl_faults.py) are
    vLLM's, listed in kv_transfer/vllm_internals.py.
"""
from __future__ import annotations

from typing import Optional

from pdserve.kv_transfer.vllm_internals import check_distribution

# `nixl` is the distribution with the `nixl` module vLLM imports (its backends: nixl-cu12/-cu13).
DISTRIBUTIONS = ("nixl",)
TESTED = ("1.5.1",)

# NIXL's Python agent hard-codes its progress thread's poll delay to 0, so the thread spins
# (poll with a zero timeout) even when no transfer is in flight: about 90 % of a core per
# idle engine here, taken from the engine it runs beside. With a delay the thread sleeps in
# poll() on UCX's armed event fds, which still wake it as soon as a transfer has work.
PROGRESS_THREAD_DELAY_KEY = "pdserve_progress_thread_delay_us"
DEFAULT_PROGRESS_THREAD_DELAY_US = 1000


def check_version(required: bool = True) -> Optional[str]:
    """Fail unless the installed NIXL is a tested one (see the module docstring)."""
    return check_distribution("NIXL", DISTRIBUTIONS, TESTED, required=required,
                              internals="pdserve/kv_transfer/nixl_internals.py")


def set_progress_thread_delay(delay_us: int) -> None:
    """Make every NIXL agent created from now on in this process use ``delay_us``."""
    import sys

    from vllm.distributed.nixl_utils import NixlWrapper

    # vLLM's module global `nixlBind`: NIXL's bindings module as vLLM imported it
    bindings = sys.modules[NixlWrapper.__module__].nixlBind
    # NIXL's `nixlAgentConfig` (pybind class), replaced by a subclass; the original kept on it
    base = getattr(bindings.nixlAgentConfig, "_pdserve_base", bindings.nixlAgentConfig)

    class AgentConfig(base):
        _pdserve_base = base

        def __setattr__(self, name, value):
            if name == "pthrDelay":  # NIXL's agent config field: the progress thread's poll delay, µs
                value = max(int(value), delay_us)
            super().__setattr__(name, value)

    bindings.nixlAgentConfig = AgentConfig
