"""Transfer statistics of the gRPC connector, in the shape vLLM carries from worker to stat loggers.

Keys follow the NIXL connector's where they mean the same thing (``transfer_duration``,
``bytes_transferred``, ``num_failed_transfers``), so one reader serves both transports.
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

_LIST_KEYS = (
    "transfer_duration",
    "bytes_transferred",
    "num_failed_transfers",
    "num_checksum_failures",
    "num_kv_expired_reqs",
    "failure_kind",
    # the prefill engine's request id of each transfer / failure, for per-request TTFT breakdowns
    "request_id",
    "failed_request_id",
    # 1 where the bytes came by same-host reference, 0 where they came inline in the stream
    "same_host",
)


@dataclass
class GrpcKVStats(KVConnectorStats):
    def __post_init__(self):
        if not self.data:
            self.reset()

    def reset(self):
        self.data = {k: [] for k in _LIST_KEYS}

    def record_transfer(self, seconds: float, nbytes: int, remote_request_id: str, same_host: bool = False) -> None:
        self.data["transfer_duration"].append(seconds)
        self.data["bytes_transferred"].append(nbytes)
        self.data["request_id"].append(remote_request_id)
        self.data["same_host"].append(int(same_host))

    def record_failure(self, kind: str, remote_request_id: str) -> None:
        self.data["num_failed_transfers"].append(1)
        self.data["failure_kind"].append(kind)
        self.data["failed_request_id"].append(remote_request_id)
        if kind == "checksum":
            self.data["num_checksum_failures"].append(1)

    def record_expired_lease(self) -> None:
        self.data["num_kv_expired_reqs"].append(1)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, values in other.data.items():
            self.data.setdefault(key, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        durations = self.data["transfer_duration"]
        total_bytes = sum(self.data["bytes_transferred"])
        total_s = sum(durations)
        return {
            "num_successful_transfers": len(durations),
            "num_failed_transfers": len(self.data["num_failed_transfers"]),
            "num_checksum_failures": len(self.data["num_checksum_failures"]),
            "num_kv_expired_reqs": len(self.data["num_kv_expired_reqs"]),
            "num_same_host_transfers": sum(self.data["same_host"]),
            "avg_transfer_ms": round(1000 * total_s / len(durations), 3) if durations else 0,
            "throughput_gb_s": round(total_bytes / total_s / 1e9, 3) if total_s else 0,
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in _LIST_KEYS)

    def take(self) -> "GrpcKVStats | None":
        """A copy of what was recorded since the last take, or None; then starts afresh."""
        if self.is_empty():
            return None
        out = GrpcKVStats(data=self.data)
        self.reset()
        return out
