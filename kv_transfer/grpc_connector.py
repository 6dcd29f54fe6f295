"""GrpcKVConnector: pdserve's own vLLM KV connector, moving KV blocks over a gRPC stream.

vLLM builds a connector twice per engine: once in the scheduler
(``KVConnectorRole.SCHEDULER``), once in each worker (``KVConnectorRole.WORKER``).
This class is the seam vLLM calls; it keeps no state of its own and hands each duty
to the half that owns it (``grpc_scheduler.GrpcKVScheduler`` /
``grpc_worker.GrpcKVWorker``).

The flow is NIXL's pull model over TCP:

1. Prefill runs the prompt with ``do_remote_decode``. When it finishes,
   ``request_finished`` keeps its blocks (lease of ``lease_seconds``) and returns
   ``kv_transfer_params`` naming the gRPC endpoint, request and blocks.
2. Decode gets the request with those params. ``get_num_new_matched_tokens`` claims
   the prompt as external tokens to load asynchronously; ``update_state_after_alloc``
   plans a pull into the freshly allocated blocks.
3. The decode worker pulls in layer-by-layer chunks, checks each chunk's CRC-32C,
   writes the blocks, and releases the lease. vLLM then recomputes the last prompt
   token and decodes. A chunk carries its bytes inline, or, between processes on one
   host that proved they can, says where they lie in the prefill process and decode
   copies them itself (``same_host.py``).
4. Any failure (unreachable, deadline, stream cut, checksum, lease gone) is reported
   as a failed receive; vLLM's ``kv_load_failure_policy`` decides between a local
   recompute and an error. The prefill frees blocks on release or lease expiry.

Enable it with::

    kv_transfer_config = {
        "kv_connector": "GrpcKVConnector",
        "kv_connector_module_path": "pdserve.kv_transfer.grpc_connector",
        "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
        "kv_connector_extra_config": GrpcKVSettings(...).to_extra(),
    }
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from pdserve.kv_transfer.grpc_scheduler import GrpcKVMetadata, GrpcKVScheduler
from pdserve.kv_transfer.grpc_settings import GrpcKVSettings
from pdserve.kv_transfer.grpc_stats import GrpcKVStats
from pdserve.kv_transfer.grpc_worker import GrpcKVWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


class GrpcKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig | None" = None):
        super().__init__(vllm_config, role, kv_cache_config)
        kv = self._kv_transfer_config
        settings = GrpcKVSettings.from_extra(kv.kv_connector_extra_config)
        engine_id = str(kv.engine_id)
        self._scheduler: GrpcKVScheduler | None = None
        self._worker: GrpcKVWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = GrpcKVScheduler(engine_id, settings)
        else:
            num_blocks = (kv_cache_config.num_blocks if kv_cache_config is not None
                          else vllm_config.cache_config.num_gpu_blocks)
            self._worker = GrpcKVWorker(engine_id, settings, int(num_blocks),
                                        is_producer=kv.is_kv_producer, is_consumer=kv.is_kv_consumer)

    # ------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Learns the KV tensors. Prefill starts its gRPC server here (it serves from
        these tensors); decode prepares its puller."""
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        """Takes this step's plan: registers new leases (prefill) and starts pulls on
        background threads (decode). Never blocks the step."""
        meta = self._get_connector_metadata()
        assert isinstance(meta, GrpcKVMetadata)
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """No-op: loads are asynchronous; the request is scheduled only once loaded."""

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """No-op: decode pulls straight from the prefill engine's KV blocks."""

    def wait_for_save(self) -> None:
        """No-op: nothing is pushed."""

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Prefill: leases released by decode or expired (their blocks may be freed).
        Decode: pulls that finished, with the failed ones also in ``failed_recving``."""
        return self._worker.get_transfer_results()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Transfers, bytes, seconds and failures since the last call."""
        return self._worker.take_stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return GrpcKVStats(data=data) if data is not None else GrpcKVStats()

    def shutdown(self) -> None:
        """Stops the server (prefill) and the pullers (decode); held blocks go with the engine."""
        if self._worker is not None:
            self._worker.shutdown()

    # --------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        """Decode: a request carrying our remote-prefill params claims the rest of its
        prompt as external tokens, loaded asynchronously."""
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        """Decode: blocks are allocated; plan the pull into them (once per request)."""
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        """Hands the worker everything planned since the last step, and whether the step runs the model."""
        return self._scheduler.build_connector_meta(scheduler_output.total_num_scheduled_tokens)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Prefill: keep the blocks on a lease and return where to pull them from.
        Decode: a request that ends before its pull releases the remote lease."""
        return self._scheduler.request_finished(request, block_ids)
