"""Worker-side half of the gRPC KV connector: serves leased blocks (prefill), pulls them (decode).

Pulls run on a small thread pool beside the engine loop, so a slow or dead prefill
never stalls decoding of other requests; vLLM keeps the pulling request parked in
WAITING_FOR_REMOTE_KVS until ``get_transfer_results`` reports it.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults

from pdserve.kv_transfer.faults import FaultSwitch
from pdserve.kv_transfer.grpc_scheduler import GrpcKVMetadata
from pdserve.kv_transfer.grpc_settings import GrpcKVSettings
from pdserve.kv_transfer.grpc_stats import GrpcKVStats
from pdserve.kv_transfer.kv_layout import BlockLayout
from pdserve.kv_transfer.kv_puller import KVPuller, PullJob, TransferFailed
from pdserve.kv_transfer.kv_server import KVStreamServicer, LeaseTable, start_server

logger = logging.getLogger("pdserve.kv_transfer")

# How long an engine step that runs no model waits for one of its pulls (decode) or of the
# streams it serves (prefill) to end. vLLM steps such
# an engine every millisecond or so, and on an engine with one core each of those steps takes
# the core and the GIL from the pull it waits for: inline pulls across hosts ran at a third of
# their speed. A request that arrives meanwhile waits at most this long for the next step.
IDLE_STEP_WAIT_S = 0.01


class GrpcKVWorker:
    def __init__(self, engine_id: str, settings: GrpcKVSettings, num_blocks: int,
                 is_producer: bool, is_consumer: bool):
        self.engine_id = engine_id
        self.settings = settings
        self.num_blocks = num_blocks
        self.is_producer = is_producer
        self.is_consumer = is_consumer
        self.leases = LeaseTable()
        self.faults = FaultSwitch(settings.fault_file)
        self.layout: BlockLayout | None = None
        self._server = None
        self._puller: KVPuller | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pull_ended = threading.Condition(self._lock)
        self._in_flight = 0
        self._step_runs_model = True
        self._loaded: set[str] = set()
        self._failed: set[str] = set()
        self._stats = GrpcKVStats()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        s = self.settings
        self.layout = BlockLayout(kv_caches, self.num_blocks)
        if self.is_producer:
            servicer = KVStreamServicer(self.engine_id, self.leases, self.layout, s.chunk_bytes, self.faults,
                                        memory_refs=s.same_host_refs)
            self._server = start_server(servicer, f"{s.bind_host}:{s.port}", s.max_message_bytes, s.tls())
            logger.info("gRPC KV server on %s:%d (%d layers, %d B per block-layer)",
                        s.bind_host, s.port, self.layout.num_layers, self.layout.block_bytes)
        if self.is_consumer:
            self._puller = KVPuller(self.layout, s.deadline_s, s.max_message_bytes, s.tls(),
                                    same_host_refs=s.same_host_refs)
            self._pool = ThreadPoolExecutor(max_workers=s.pull_workers, thread_name_prefix="kv-pull")

    def start_load_kv(self, meta: GrpcKVMetadata) -> None:
        for request_id, (block_ids, expires_at) in meta.leases.items():
            self.leases.add(request_id, block_ids, expires_at)
        self._step_runs_model = meta.runs_model
        if self._pool is None:
            return
        for job in meta.pulls:
            with self._lock:
                self._in_flight += 1
            self._pool.submit(self._pull, job)
        for job in meta.releases:
            self._pool.submit(self._puller.release, job, False)

    def _pull(self, job: PullJob) -> None:
        try:
            self._pull_once(job)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._pull_ended.notify_all()

    def _pull_once(self, job: PullJob) -> None:
        start = time.perf_counter()
        try:
            pulled = self._puller.pull(job)
        except Exception as e:  # noqa: BLE001 - any error is a failed load, never a hang
            kind = e.kind if isinstance(e, TransferFailed) else type(e).__name__
            if isinstance(e, TransferFailed):
                logger.warning("KV pull of %s from %s:%d failed (%s); vLLM's load-failure policy takes over",
                               job.request_id, job.host, job.port, e)
            else:
                logger.exception("KV pull of %s crashed", job.request_id)
            with self._lock:
                self._failed.add(job.request_id)
                self._stats.record_failure(kind, job.remote_request_id)
            # Even after "unreachable": a link that refuses pulls may still carry the release,
            # and it frees the prefill blocks now instead of at lease expiry.
            self._puller.release(job, ok=False)
            return
        with self._lock:
            self._loaded.add(job.request_id)
            self._stats.record_transfer(time.perf_counter() - start, pulled.nbytes, job.remote_request_id,
                                        pulled.same_host)
        self._puller.release(job, ok=True)

    def get_transfer_results(self) -> KVConnectorTransferResults:
        sending: set[str] = set()
        if self.is_producer:
            if not self._step_runs_model:
                self.leases.wait_for_a_stream_to_end(IDLE_STEP_WAIT_S)
            sending, expired = self.leases.collect_ended(time.monotonic())
            if expired:
                logger.warning("%d KV lease(s) expired without a pull; blocks freed", expired)
                with self._lock:
                    for _ in range(expired):
                        self._stats.record_expired_lease()
        with self._lock:
            if not self._step_runs_model and self._in_flight and not (self._loaded or self._failed):
                self._pull_ended.wait(IDLE_STEP_WAIT_S)
            loaded, failed = self._loaded, self._failed
            self._loaded, self._failed = set(), set()
        return KVConnectorTransferResults(
            finished_sending=sending, finished_recving=loaded | failed, failed_recving=failed
        )

    def take_stats(self) -> GrpcKVStats | None:
        with self._lock:
            return self._stats.take()

    def shutdown(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1.0)
            self._server = None
        self.leases.drop_all()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._puller is not None:
            self._puller.close()
