"""A vLLM stat logger that keeps the engine's latest load and running KV-transfer totals.

vLLM calls ``record`` after every engine step with the scheduler's stats. The router
reads the resulting ``LoadReport`` to pick replicas; tests read the transfer counters
to prove that KV really moved.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase


@dataclass
class LoadReport:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    preemptions_total: int = 0
    # Prompt tokens whose KV came from outside the engine (the KV connector).
    external_hit_tokens_total: int = 0
    external_query_tokens_total: int = 0
    kv_transfers_total: int = 0
    kv_transfer_bytes_total: int = 0
    kv_transfer_seconds_total: float = 0.0
    kv_transfer_failures_total: int = 0
    kv_expired_total: int = 0
    kv_checksum_failures_total: int = 0
    # gRPC transport: pulls whose bytes came by same-host reference rather than inline
    kv_same_host_transfers_total: int = 0
    kv_failure_kinds: dict[str, int] = field(default_factory=dict)
    steps_total: int = 0
    # Tokens the engine's KV cache holds when full (blocks x block size); 0 until known.
    kv_capacity_tokens: int = 0
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FAILURE_KEYS = ("num_failed_transfers", "num_failed_notifications", "num_failed_handshakes")


_RECENT_TRANSFERS = 4096


class LoadTracker:
    """Shared between the stat-logger instances vLLM creates and the server that reads them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.report = LoadReport()
        # prefill request id -> this engine's pull of it, for connectors that name requests
        self._transfers: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def set_kv_capacity(self, vllm_config) -> None:
        cache = getattr(vllm_config, "cache_config", None)
        blocks = getattr(cache, "num_gpu_blocks", None) if cache is not None else None
        if blocks:
            with self._lock:
                self.report.kv_capacity_tokens = int(blocks) * int(cache.block_size)

    def transfer_of(self, remote_request_id: str | None) -> dict[str, Any] | None:
        if not remote_request_id:
            return None
        with self._lock:
            return self._transfers.get(remote_request_id)

    def _remember(self, rid: str, entry: dict[str, Any]) -> None:
        self._transfers[rid] = entry
        while len(self._transfers) > _RECENT_TRANSFERS:
            self._transfers.popitem(last=False)

    def snapshot(self) -> LoadReport:
        with self._lock:
            return LoadReport(**asdict(self.report))

    def record(self, scheduler_stats, iteration_stats) -> None:
        with self._lock:
            r = self.report
            r.updated_at = time.time()
            r.steps_total += 1
            if iteration_stats is not None:
                r.preemptions_total += getattr(iteration_stats, "num_preempted_reqs", 0)
            if scheduler_stats is None:
                return
            r.running = scheduler_stats.num_running_reqs
            r.waiting = scheduler_stats.num_waiting_reqs + getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
            r.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
            ext = scheduler_stats.connector_prefix_cache_stats
            if ext is not None:
                r.external_hit_tokens_total += ext.hits
                r.external_query_tokens_total += ext.queries
            self._add_connector_stats(r, scheduler_stats.kv_connector_stats)

    def _add_connector_stats(self, r: LoadReport, stats: dict[str, Any] | None) -> None:
        if not stats:
            return
        # NIXL and the gRPC connector report {"transfer_duration": [...], "bytes_transferred": [...], ...};
        # multi-connector setups nest one such dict per connector.
        groups = [stats] if "bytes_transferred" in stats else [v for v in stats.values() if isinstance(v, dict)]
        for g in groups:
            durations = g.get("transfer_duration") or []
            r.kv_transfers_total += len(durations)
            r.kv_transfer_seconds_total += float(sum(durations))
            r.kv_transfer_bytes_total += int(sum(g.get("bytes_transferred") or []))
            r.kv_transfer_failures_total += int(sum(sum(g.get(k) or []) for k in _FAILURE_KEYS))
            r.kv_expired_total += int(sum(g.get("num_kv_expired_reqs") or []))
            r.kv_checksum_failures_total += int(sum(g.get("num_checksum_failures") or []))
            r.kv_same_host_transfers_total += int(sum(g.get("same_host") or []))
            for kind in g.get("failure_kind") or []:
                r.kv_failure_kinds[kind] = r.kv_failure_kinds.get(kind, 0) + 1
            modes = g.get("same_host") or [None] * len(durations)
            for rid, seconds, nbytes, mode in zip(g.get("request_id") or [], durations, g.get("bytes_transferred") or [],
                                                  modes):
                pull = {"ok": True, "seconds": seconds, "bytes": nbytes}
                if mode is not None:
                    pull["same_host"] = bool(mode)
                self._remember(rid, pull)
            for rid, kind in zip(g.get("failed_request_id") or [], g.get("failure_kind") or []):
                self._remember(rid, {"ok": False, "kind": kind})


def stat_logger_factory(tracker: LoadTracker):
    class _PdserveLoadLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.engine_index = engine_index
            self.vllm_config = vllm_config
            tracker.set_kv_capacity(vllm_config)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            tracker.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self):
            # the KV cache is sized by now (num_gpu_blocks comes back from the engine core)
            tracker.set_kv_capacity(self.vllm_config)

    return _PdserveLoadLogger
