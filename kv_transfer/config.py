"""The `kv_transfer` section of a config: transport, lease, failure policy, gRPC and NIXL knobs.

It lives with kv_transfer/ (each layer's config with its layer) and imports nothing of pdserve,
so kv_transfer/registry.py reads it without importing engine/ (which imports kv_transfer/);
settings/cluster.py's ClusterConfig holds it as its `kv_transfer` section.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GrpcTLSSpec(_Strict):
    cert: Optional[str] = None  # prefill: PEM certificate it serves with
    key: Optional[str] = None   # prefill: its private key
    ca: Optional[str] = None    # decode: CA that signed the prefill certificates

    @model_validator(mode="after")
    def _check_files(self):
        if bool(self.cert) != bool(self.key):
            raise ValueError("kv_transfer.grpc.tls: 'cert' and 'key' go together")
        if not self.ca:
            raise ValueError("kv_transfer.grpc.tls: 'ca' is required (decode verifies the prefill endpoint)")
        for name in ("cert", "key", "ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"kv_transfer.grpc.tls.{name}: file not found: {path}")
        return self


class GrpcTransportSpec(_Strict):
    # Whole-transfer deadline: past it decode gives up and vLLM's failure policy runs.
    deadline_s: float = Field(10.0, gt=0)
    # Bytes of one layer's blocks per stream message; bounded by max_message_bytes.
    chunk_bytes: int = Field(4 << 20, ge=4096)
    max_message_bytes: int = Field(64 << 20, ge=1 << 20)
    bind_host: str = "0.0.0.0"
    pull_workers: int = Field(4, ge=1, le=64)
    # A decode on the same host as its prefill (same PID namespace, memory readable) copies the
    # KV out of the prefill process by reference instead of receiving it in the stream (one
    # kernel copy, as UCX does there). False: bytes always travel inline, as across hosts.
    same_host_refs: bool = True
    tls: Optional[GrpcTLSSpec] = None

    @model_validator(mode="after")
    def _check_sizes(self):
        if self.chunk_bytes + 4096 > self.max_message_bytes:
            raise ValueError("kv_transfer.grpc.chunk_bytes must leave 4 KiB of room below max_message_bytes")
        return self


class NixlTransportSpec(_Strict):
    # A decode engine's READ still in flight after this long fails, and vLLM's failure policy
    # runs (recompute): a partitioned link must not hold a request for UCX's TCP timeouts.
    read_deadline_s: float = Field(10.0, gt=0)


class KVTransferSpec(_Strict):
    transport: Literal["nixl", "grpc"] = "nixl"
    buffer_device: Literal["cpu", "cuda"] = "cpu"
    # Each engine gets side_channel_base_port + its global engine index.
    side_channel_base_port: int = Field(15600, ge=1024, le=65000)
    # Seconds a prefill holds finished blocks for a decode that never pulls them.
    lease_seconds: int = Field(30, ge=2)
    # What decode does when a KV load fails. "recompute" (chosen on purpose) prefills
    # locally before the first token: monolithic fallback in the same healthy engine,
    # with no extra hop; the router labels it from the engine's pull report. "fail"
    # would end the request with finish_reason "error".
    load_failure_policy: Literal["fail", "recompute"] = "recompute"
    grpc: GrpcTransportSpec = Field(default_factory=GrpcTransportSpec)
    nixl: NixlTransportSpec = Field(default_factory=NixlTransportSpec)
