"""Maps the configured transport to the vLLM ``kv_transfer_config`` of each engine role.

The router never looks at the transport: it only forwards the opaque
``kv_transfer_params`` that the prefill engine returns to the decode engine.
"""
from __future__ import annotations

from typing import Any

from pdserve.engine.config import ClusterConfig

_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}


def kv_transfer_config_for(cfg: ClusterConfig, role: str) -> dict[str, Any]:
    """The ``KVTransferConfig`` kwargs for an engine in ``role`` ("prefill" or "decode")."""
    if role not in _ROLE:
        raise ValueError(f"role {role!r} takes no KV connector")
    kv = cfg.kv_transfer
    if kv.transport == "nixl":
        return {
            "kv_connector": "NixlConnector",
            "kv_role": _ROLE[role],
            "kv_buffer_device": kv.buffer_device,
            "kv_load_failure_policy": kv.load_failure_policy,
            "kv_connector_extra_config": {"kv_lease_duration": kv.lease_seconds, "backends": ["UCX"]},
        }
    raise NotImplementedError(
        f"KV transport {kv.transport!r} is not available in this build; use 'nixl'"
    )


def prefill_request_params() -> dict[str, Any]:
    """``kv_transfer_params`` for the prefill leg: compute the prompt, keep its blocks for a remote decode."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
