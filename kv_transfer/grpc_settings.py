"""Settings of the gRPC KV connector, carried to the engine in ``kv_connector_extra_config``."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pdserve.kv_transfer.kv_server import TLSFiles


@dataclass(frozen=True)
class GrpcKVSettings:
    host: str                 # address decode engines dial (advertised in kv_transfer_params)
    port: int                 # this engine's gRPC port (prefill serves on it)
    bind_host: str = "0.0.0.0"
    lease_seconds: float = 30.0
    deadline_s: float = 10.0
    max_message_bytes: int = 64 << 20
    chunk_bytes: int = 4 << 20
    pull_workers: int = 4
    same_host_refs: bool = True  # same-host pairs copy by reference (same_host.py); False: bytes inline
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    fault_file: str | None = None

    def to_extra(self) -> dict[str, Any]:
        return {"pdserve_grpc": asdict(self)}

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "GrpcKVSettings":
        raw = (extra or {}).get("pdserve_grpc")
        if not isinstance(raw, dict):
            raise ValueError("GrpcKVConnector needs kv_connector_extra_config['pdserve_grpc']")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown gRPC KV settings: {sorted(unknown)}")
        return cls(**raw)

    def tls(self) -> TLSFiles | None:
        if not (self.tls_cert or self.tls_key or self.tls_ca):
            return None
        return TLSFiles(cert=self.tls_cert, key=self.tls_key, ca=self.tls_ca)
