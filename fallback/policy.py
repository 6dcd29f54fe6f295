"""Which failures of the P/D path are served by monolithic fallback, and under what name.

The action is always the same: send the untouched request to a healthy engine without
``kv_transfer_params``, so it runs a full local prefill (every engine holds full weights):
a decode engine, or a prefill engine when the decode pool has none healthy. Before the
first token this is invisible to the client apart from the ``x-pdserve-path: fallback``
and ``x-pdserve-fallback-cause`` headers.
"""
from __future__ import annotations

import enum


class FallbackCause(str, enum.Enum):
    NO_PREFILL_REPLICA = "no_prefill_replica"
    # The decode pool has no healthy replica (its only one was killed, or its host is
    # gone): the request runs whole on a healthy prefill engine instead of waiting for
    # Ray Serve to bring a decode replica back. P/D resumes as soon as one is healthy.
    NO_DECODE_REPLICA = "no_decode_replica"
    # The prefill leg raised or answered 5xx. A 4xx is the client's fault and is returned
    # as it is: a monolithic engine would reject the request the same way.
    PREFILL_ERROR = "prefill_error"
    PREFILL_TIMEOUT = "prefill_timeout"
    # The replica chosen for the prefill leg stopped answering its load polls (its
    # process died or hangs) while the leg was waiting on it.
    PREFILL_REPLICA_LOST = "prefill_replica_lost"
    NO_KV_PARAMS = "prefill_returned_no_kv_params"
    # Every link from the healthy prefill replicas to the decode pool has an open breaker.
    LINK_OPEN = "link_circuit_open"
    # Decode reported that pulling the KV failed (link down, stream cut, checksum, lease
    # gone); it then prefilled locally (vLLM kv_load_failure_policy "recompute").
    KV_TRANSFER_FAILED = "kv_transfer_failed"
    # The pull outlived its deadline, which the router takes from the request's TTFT budget.
    KV_DEADLINE = "kv_transfer_deadline"
    # The engine chosen to serve the request (a decode leg, or the whole request) was lost
    # before the first item: it refused or dropped its direct connection (the replica is
    # marked unhealthy at once), or its load polls marked it unhealthy while the router
    # waited (a partitioned host sends nothing, not even a reset). The request runs whole
    # on another healthy engine.
    REPLICA_LOST = "replica_lost"
