"""Scheduler-side half of the gRPC KV connector: decides what is leased and what is pulled.

It only keeps books; all bytes move in the worker. Each engine step it hands the
worker the new leases (prefill) and the new pulls (decode) in ``GrpcKVMetadata``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from pdserve.kv_transfer.faults import FaultSwitch
from pdserve.kv_transfer.grpc_settings import GrpcKVSettings
from pdserve.kv_transfer.kv_puller import PullJob

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

TRANSPORT = "grpc"
_REMOTE_KEYS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port")


@dataclass
class GrpcKVMetadata(KVConnectorMetadata):
    # prefill: request id -> (block ids, lease expiry on time.monotonic())
    leases: dict[str, tuple[list[int], float]] = field(default_factory=dict)
    # decode: blocks to pull, and leases to end without pulling (request aborted first)
    pulls: list[PullJob] = field(default_factory=list)
    releases: list[PullJob] = field(default_factory=list)
    # False when this engine step computes no token (the engine only waits on transfers)
    runs_model: bool = True


def _is_remote_prefill(params: dict[str, Any] | None) -> bool:
    return bool(params and params.get("do_remote_prefill") and params.get("transport") == TRANSPORT
                and all(params.get(k) is not None for k in _REMOTE_KEYS))


def _job(request: "Request", params: dict[str, Any], local: list[int], first: int) -> PullJob:
    return PullJob(
        request_id=request.request_id,
        remote_request_id=str(params["remote_request_id"]),
        remote_engine_id=str(params["remote_engine_id"]),
        host=str(params["remote_host"]),
        port=int(params["remote_port"]),
        local_block_ids=local,
        first_remote_block=first,
        deadline_s=float(params["transfer_deadline_s"]) if params.get("transfer_deadline_s") else None,
    )


class GrpcKVScheduler:
    def __init__(self, engine_id: str, settings: GrpcKVSettings):
        self.engine_id = engine_id
        self.settings = settings
        self._meta = GrpcKVMetadata()
        self.faults = FaultSwitch(settings.fault_file)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        if not _is_remote_prefill(request.kv_transfer_params):
            return 0, False
        count = len(request.prompt_token_ids or ()) - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not _is_remote_prefill(params):
            return
        if num_external_tokens > 0:
            group = blocks.blocks[0]
            hit = sum(1 for b in group if b.block_hash is not None and not b.is_null)
            local = [b.block_id for b in group if b.block_hash is None and not b.is_null]
            self._meta.pulls.append(_job(request, params, local, hit))
        else:
            self._meta.releases.append(_job(request, params, [], 0))
        # One transfer per request; the second call (after the load) must not pull again.
        params["do_remote_prefill"] = False

    def build_connector_meta(self, scheduled_tokens: int) -> GrpcKVMetadata:
        meta, self._meta = self._meta, GrpcKVMetadata()
        meta.runs_model = scheduled_tokens > 0
        return meta

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if _is_remote_prefill(params):
            # Decode side, finished before its pull was planned (e.g. aborted while
            # queued): end the remote lease now instead of at expiry.
            self._meta.releases.append(_job(request, params, [], 0))
            params["do_remote_prefill"] = False
            return False, None
        if not params.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None
        if not block_ids or self.faults.current().drop_kv_params:
            return False, None
        s = self.settings
        self._meta.leases[request.request_id] = (list(block_ids), time.monotonic() + s.lease_seconds)
        return True, {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transport": TRANSPORT,
            "remote_engine_id": self.engine_id,
            "remote_request_id": request.request_id,
            "remote_host": s.host,
            "remote_port": s.port,
            "remote_block_ids": list(block_ids),
            "remote_num_tokens": request.num_computed_tokens,
            "lease_seconds": s.lease_seconds,
        }
