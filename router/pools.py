"""The router's view of one engine pool: its live replicas, their load, our in-flight calls."""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Protocol

from pdserve.engine.direct_stream import DirectStream, SpareConnections
from pdserve.router.selection import Candidate
from pdserve.router.targeting import POOL_VIEWS, TARGET_KWARG

logger = logging.getLogger("pdserve.router")


@dataclass
class ReplicaState:
    replica_id: str
    load: dict[str, Any] = field(default_factory=dict)
    inflight: int = 0
    healthy: bool = True
    last_ok: float = 0.0
    failures: int = 0
    streamed_at: float = float("-inf")  # time.monotonic() of the last report an engine call's end carried


class LegWatcher(Protocol):
    """An engine call the pool gives up when the replica serving it turns unhealthy."""

    def watched_replica(self) -> Optional[str]: ...

    def lose(self, why: str) -> None: ...


class Pool:
    # A replica is marked unhealthy on a failed load call, or after this many load
    # calls in a row that time out (a busy replica may answer one late). Its legs are then
    # given up, so the timeout leaves room for a replica that is merely busy: on a 2-core lab
    # a healthy prefill replica answered a 1 s poll late twice while engines started beside it.
    # A silent peer is still cut off in about 4 s (and by TCP_USER_TIMEOUT on its streams).
    TIMEOUTS_BEFORE_UNHEALTHY = 2

    def __init__(self, name: str, handle, poll_timeout_s: float = 2.0, direct_streams: bool = True) -> None:
        self.name = name
        self.handle = handle
        self.direct_streams = direct_streams
        self.deployment = handle.deployment_name
        self.poll_timeout_s = poll_timeout_s
        self.replicas: dict[str, ReplicaState] = {}
        self.last_error: Optional[str] = None
        self.last_call = float("-inf")  # time.monotonic() of the last engine call started here
        self.spares = SpareConnections()  # a direct-stream connection per replica, opened ahead
        self._legs: "weakref.WeakSet[LegWatcher]" = weakref.WeakSet()

    async def refresh(self, fresh_s: float = 0.0) -> None:
        """Polls the load of each live replica over Ray, except a healthy one whose last
        engine call ended less than ``fresh_s`` ago: that call's end carried its load
        (``take_report``), as fresh as a poll's. A busy replica then costs no Ray calls, whose
        CPU on a small machine comes out of the engines' cores and the requests' time to
        first token."""
        view = POOL_VIEWS.get(self.deployment)
        if view is None:
            # The first call through the handle creates its request router (and view).
            await asyncio.wait_for(self.handle.load.remote(), self.poll_timeout_s)
            view = POOL_VIEWS.get(self.deployment)
            if view is None:
                return
        ids = view.live_replica_ids()
        self.last_error = None
        for gone in set(self.replicas) - set(ids):
            del self.replicas[gone]
        since = time.monotonic() - fresh_s
        polled = [rid for rid in ids if not self._reported_since(rid, since)]
        results = await asyncio.gather(
            *(asyncio.wait_for(self.handle.load.remote(**{TARGET_KWARG: rid}), self.poll_timeout_s) for rid in polled),
            return_exceptions=True,
        )
        now = time.time()
        for rid, res in zip(polled, results):
            st = self.replicas.setdefault(rid, ReplicaState(rid))
            if isinstance(res, BaseException) or res.get("replica") != rid:
                st.failures += 1
                timed_out = isinstance(res, (asyncio.TimeoutError, TimeoutError))
                if not timed_out or st.failures >= self.TIMEOUTS_BEFORE_UNHEALTHY:
                    st.healthy = False
            else:
                st.load = res
                st.healthy = True
                st.failures = 0
                st.last_ok = now
        self.sweep()

    def _reported_since(self, replica_id: str, since: float) -> bool:
        st = self.replicas.get(replica_id)
        return st is not None and st.healthy and st.streamed_at > since

    def take_report(self, replica_id: Optional[str], report: dict[str, Any]) -> None:
        """The load report an engine call's end carried (engine/direct_stream.py): the
        replica's load now, as a poll would have read it. It does not make an unhealthy
        replica healthy again; only an answered poll does."""
        st = self.replicas.get(replica_id or "")
        if st is None or report.get("replica") != replica_id:
            return
        st.load = report
        st.last_ok = time.time()
        st.streamed_at = time.monotonic()

    def is_healthy(self, replica_id: str) -> bool:
        st = self.replicas.get(replica_id)
        return st is not None and st.healthy

    def busy_since(self, since: float) -> bool:
        """Whether an engine call runs here now, or one started after ``since`` (monotonic)."""
        return self.last_call > since or any(st.inflight for st in self.replicas.values())

    def has_healthy(self) -> bool:
        return any(st.healthy for st in self.replicas.values())

    def mark_down(self, replica_id: str, error: BaseException) -> None:
        """A call could not reach the replica, or lost its connection: unhealthy now, so the
        next requests pick another; its next answered load poll makes it healthy again."""
        st = self.replicas.get(replica_id)
        if st is not None and st.healthy:
            st.healthy = False
            logger.warning("%s replica %s marked unhealthy: its direct stream failed: %r", self.name, replica_id, error)

    def watch(self, leg: LegWatcher) -> None:
        self._legs.add(leg)

    def unwatch(self, leg: LegWatcher) -> None:
        self._legs.discard(leg)

    def sweep(self) -> None:
        """Gives up every watched call whose replica is marked unhealthy, so none waits on a
        silent peer until TCP gives up. Runs when health changes (each load poll, each
        failed connection), never per token. A replica that left the pool's view is not
        swept: Ray Serve may be draining it (scale-down), and its calls end on their own."""
        for leg in list(self._legs):
            st = self.replicas.get(leg.watched_replica() or "")
            if st is not None and not st.healthy:
                self._legs.discard(leg)
                leg.lose(f"{self.name} replica {st.replica_id} is unhealthy (failed load polls or connection)")

    def candidates(self) -> list[Candidate]:
        return [
            Candidate(
                replica_id=st.replica_id,
                pool=self.name,
                healthy=st.healthy,
                running=int(st.load.get("running", 0)),
                waiting=int(st.load.get("waiting", 0)),
                kv_cache_usage=float(st.load.get("kv_cache_usage", 0.0)),
                inflight=st.inflight,
            )
            for st in self.replicas.values()
        ]

    @contextmanager
    def track(self, replica_id: Optional[str]):
        st = self.replicas.get(replica_id) if replica_id else None
        if st is not None:
            st.inflight += 1
        try:
            yield
        finally:
            if st is not None:
                st.inflight -= 1

    def stream(self, replica_id: Optional[str], endpoint: str, body: dict[str, Any]) -> AsyncIterator[list]:
        """One engine call's item batches: over a direct connection to the replica when it
        has reported one (engine/direct_stream.py), else as a Ray Serve streaming call.

        A direct connection that is refused or dropped marks the replica unhealthy at once
        and fails the call (``StreamBroken``); the router then serves it elsewhere. It is not
        handed to Ray Serve, which would hold it until Ray restarts a replica of this pool."""
        self.last_call = time.monotonic()
        st = self.replicas.get(replica_id) if replica_id else None
        address = st.load.get("stream") if st is not None and self.direct_streams else None
        if address:
            return DirectStream(address, endpoint, body, on_down=lambda e: self.mark_down(replica_id, e),
                                spares=self.spares, on_report=lambda report: self.take_report(replica_id, report))
        kwargs = {TARGET_KWARG: replica_id} if replica_id else {}
        return self.handle.options(stream=True).generate.remote(endpoint, body, **kwargs)

    def status(self) -> list[dict[str, Any]]:
        out = []
        for st in self.replicas.values():
            load = {k: st.load.get(k) for k in ("running", "waiting", "kv_cache_usage", "cores", "pid", "kv_port",
                                                "kv_transfers_total", "kv_transfer_bytes_total",
                                                "kv_transfer_seconds_total", "kv_transfer_failures_total",
                                                "kv_failure_kinds", "kv_checksum_failures_total",
                                                "kv_expired_total", "kv_same_host_transfers_total",
                                                "external_hit_tokens_total",
                                                "preemptions_total", "faults")}
            stream = st.load.get("stream") or {}
            out.append({"replica": st.replica_id, "healthy": st.healthy, "inflight": st.inflight,
                        "stream_port": stream.get("port"), **load})
        return out
