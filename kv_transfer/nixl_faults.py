"""vLLM's NixlConnector with pdserve's fault switch and per-request failure reports.

Behaviour is NIXL's own; two additions on the decode (puller) side:
- faults from the engine's fault switch (faults.py) enter where NIXL starts a READ: a
  killed link or a failed fraction goes down NIXL's own failure path
  (``_handle_failed_transfer``), exactly as a transport error would;
- every failed receive is reported with the prefill engine's request id, so the router
  can tell which request fell back (the gRPC connector does the same).
- a READ still in flight after ``pdserve_read_deadline_s`` fails down the same path, its
  handles released: UCX over TCP waits minutes on a peer behind a partition, and without a
  deadline the decode request waited with it (the router's request timeout answered 503).

Delays and corruption are gRPC-only faults: NIXL moves bytes in UCX, out of our reach.

Every private name of vLLM's NixlConnector / NixlConnectorWorker used here is listed in
kv_transfer/vllm_internals.py, whose version check runs before an engine starts.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats

from pdserve.kv_transfer.faults import FaultSwitch
# The NIXL agent's progress-thread delay, a patch of NIXL's bindings, lives with NIXL's other
# internals; re-exported here, where it was defined before.
from pdserve.kv_transfer.nixl_internals import (DEFAULT_PROGRESS_THREAD_DELAY_US,
                                                PROGRESS_THREAD_DELAY_KEY, set_progress_thread_delay)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger("pdserve.kv_transfer")

FAULT_FILE_KEY = "pdserve_fault_file"
READ_DEADLINE_KEY = "pdserve_read_deadline_s"


class _NixlStatsWithRequestIds(NixlKVConnectorStats):
    """NIXL's stats plus our per-request failure lists, which NIXL's aggregate would reject."""

    def aggregate(self, other):
        if not other.is_empty():
            for key, values in other.data.items():
                self.data.setdefault(key, []).extend(values)
        return self


class FaultableNixlConnector(NixlConnector):
    @classmethod
    def build_kv_connector_stats(cls, data=None):
        return _NixlStatsWithRequestIds(data=data) if data is not None else _NixlStatsWithRequestIds()

    def __init__(self, vllm_config: "VllmConfig", role: "KVConnectorRole",
                 kv_cache_config: "KVCacheConfig | None" = None):
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        set_progress_thread_delay(int(extra.get(PROGRESS_THREAD_DELAY_KEY, DEFAULT_PROGRESS_THREAD_DELAY_US)))
        super().__init__(vllm_config, role, kv_cache_config)
        worker = self.connector_worker
        if worker is None or not hasattr(worker, "_read_blocks_for_req"):
            return
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        switch = FaultSwitch(extra.get(FAULT_FILE_KEY))
        read_blocks_for_req = worker._read_blocks_for_req
        handle_failed_transfer = worker._handle_failed_transfer

        def faulty_read_blocks_for_req(req_id, meta):
            # Only reads that fill local blocks can fail this way: NIXL's failure path needs
            # them (notify-only reads, for aborts and full local hits, carry no blocks).
            fault = switch.current()
            if req_id in worker._recving_metadata and any(meta.local_block_ids) and (
                    fault.kill_links or switch.roll(fault.fail)):
                logger.warning("NIXL read of %s refused: KV link down (injected fault)", req_id)
                worker._handle_failed_transfer(req_id, None, worker._recv_failures)
                return
            read_blocks_for_req(req_id, meta)

        def reporting_handle_failed_transfer(req_id, handle, failed_req_ids=None, record_failed_transfer=True):
            # Every receive failure, reported once per request: injected, a failed handshake
            # (passed NIXL's _recv_failures), or a failed or timed-out READ (passed the local set
            # of _pop_done_transfers).
            meta = worker._recving_metadata.get(req_id)
            kind = worker._pdserve_failure_kind.pop(req_id, "nixl")
            if (failed_req_ids is not None and req_id not in failed_req_ids and req_id not in worker._recv_failures
                    and meta is not None and meta.remote is not None):
                data = worker.xfer_stats.data
                data.setdefault("failed_request_id", []).append(meta.remote.request_id)
                data.setdefault("failure_kind", []).append(kind)
                if not record_failed_transfer:
                    # NIXL leaves a failed handshake (or an expiry) out of its failure count, and
                    # stats that count nothing are never sent: the report would be lost.
                    worker.xfer_stats.record_failed_transfer()
            return handle_failed_transfer(req_id, handle, failed_req_ids, record_failed_transfer)

        worker._pdserve_failure_kind = {}
        worker._read_blocks_for_req = faulty_read_blocks_for_req
        worker._handle_failed_transfer = reporting_handle_failed_transfer
        deadline_s = float(extra.get(READ_DEADLINE_KEY) or 0)
        if deadline_s > 0:
            _add_read_deadline(worker, deadline_s)


def _add_read_deadline(worker, deadline_s: float) -> None:
    """Fail reads of the decode worker that outlive ``deadline_s`` (see the module docstring).

    Reaches into NixlConnectorWorker's private ``_read_blocks_for_req``, ``_pop_done_transfers``,
    ``_recving_transfers`` and ``_handle_failed_transfer`` (vllm 0.32.0).
    """
    started: dict[str, float] = {}
    read_blocks_for_req = worker._read_blocks_for_req
    pop_done_transfers = worker._pop_done_transfers

    def timed_read_blocks_for_req(req_id, meta):
        started.setdefault(req_id, time.monotonic())
        read_blocks_for_req(req_id, meta)

    def pop_done_transfers_with_deadline(transfers):
        done, failed = pop_done_transfers(transfers)
        if transfers is not worker._recving_transfers:
            return done, failed
        now = time.monotonic()
        for req_id in list(transfers):
            if now - started.get(req_id, now) <= deadline_s:
                continue
            logger.warning("NIXL read of %s still in flight after %.1fs: failed (deadline)", req_id, deadline_s)
            worker._pdserve_failure_kind[req_id] = "deadline"
            kept = [h for h in transfers[req_id] if not worker._handle_failed_transfer(req_id, h, failed)]
            if kept:
                transfers[req_id] = kept  # NIXL could not release them yet; tried again next step
            else:
                del transfers[req_id]
                done.add(req_id)
        for req_id in list(started):
            if req_id not in transfers:
                del started[req_id]
        return done, failed

    worker._read_blocks_for_req = timed_read_blocks_for_req
    worker._pop_done_transfers = pop_done_transfers_with_deadline
