"""Maps the configured transport to the vLLM ``kv_transfer_config`` of each engine role.

The router never looks at the transport: it only forwards the opaque
``kv_transfer_params`` that the prefill engine returns to the decode engine.
"""
from __future__ import annotations

from typing import Any, Protocol

from pdserve.kv_transfer.config import KVTransferSpec


class HasKVTransfer(Protocol):
    """What this module reads of a config: its `kv_transfer` section (settings/cluster.py's
    ClusterConfig is one). Typed this way so kv_transfer/ depends on its own section only."""

    kv_transfer: KVTransferSpec


_ROLE = {"prefill": "kv_producer", "decode": "kv_consumer"}


def kv_transfer_config_for(cfg: HasKVTransfer, role: str, *, port: int, host: str,
                           fault_file: str | None = None) -> dict[str, Any]:
    """The ``KVTransferConfig`` kwargs for an engine in ``role`` ("prefill" or "decode").

    ``port`` is the engine's own KV port (NIXL side channel, or gRPC server), ``host``
    the address peers reach it at.
    """
    if role not in _ROLE:
        raise ValueError(f"role {role!r} takes no KV connector")
    kv = cfg.kv_transfer
    common = {
        "kv_role": _ROLE[role],
        "kv_buffer_device": kv.buffer_device,
        "kv_load_failure_policy": kv.load_failure_policy,
    }
    if kv.transport == "nixl":
        from pdserve.kv_transfer.nixl_faults import FAULT_FILE_KEY, READ_DEADLINE_KEY

        return {**common, "kv_connector": "FaultableNixlConnector",
                "kv_connector_module_path": "pdserve.kv_transfer.nixl_faults",
                "kv_connector_extra_config": {"kv_lease_duration": kv.lease_seconds, "backends": ["UCX"],
                                              FAULT_FILE_KEY: fault_file,
                                              READ_DEADLINE_KEY: kv.nixl.read_deadline_s}}
    from pdserve.kv_transfer.grpc_settings import GrpcKVSettings

    g = kv.grpc
    tls = g.tls
    settings = GrpcKVSettings(
        host=host, port=port, bind_host=g.bind_host, lease_seconds=float(kv.lease_seconds),
        deadline_s=g.deadline_s, max_message_bytes=g.max_message_bytes, chunk_bytes=g.chunk_bytes,
        pull_workers=g.pull_workers, tls_cert=tls.cert if tls else None, tls_key=tls.key if tls else None,
        tls_ca=tls.ca if tls else None, fault_file=fault_file, same_host_refs=g.same_host_refs,
    )
    return {**common, "kv_connector": "GrpcKVConnector",
            "kv_connector_module_path": "pdserve.kv_transfer.grpc_connector",
            "kv_connector_extra_config": settings.to_extra()}


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
