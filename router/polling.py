"""Load polling: each pool's replicas, their load and health, and what the router learns
from them (per-replica gauges, KV transfer counters, the fleet's KV pressure for admission
and the ladder, Ray Serve's replica counts)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Optional

from pdserve.admission.fleet_gate import FleetState

if TYPE_CHECKING:
    from pdserve.router.core import Router
    from pdserve.router.pools import Pool

logger = logging.getLogger("pdserve.router")

_LIVE_STATES = ("STARTING", "UPDATING", "RECOVERING", "RUNNING")
# A router is idle once no engine call has run or started for this long.
IDLE_AFTER_S = 2.0
# Between serve.status() calls, made only where a pool autoscales (LoadPoller.__init__).
SERVE_POLL_PERIOD_S = 5.0


class LoadPoller:
    def __init__(self, router: "Router") -> None:
        self.router = router
        self.metrics = router.metrics
        self._preempt_seen: Optional[tuple[float, int]] = None
        self._kv_seen: dict[str, tuple[int, float, int]] = {}  # decode replica -> (bytes, seconds, count)
        self._last_serve_poll = 0.0
        # serve.status() costs tens of ms of the router's CPU (Ray pickles each deployment's
        # request-router class) and holds the GIL while it does, which showed in the tail of
        # TTFT: asked every 5 s, and only where a pool autoscales. A fixed pool's count is its
        # config's: Ray Serve keeps that many replicas, replacing any that die.
        pools = router.cfg.pools()
        self._autoscaled = {name for name, pool in pools.items() if pool.autoscaling}
        for name, pool in pools.items():
            if name not in self._autoscaled:
                self.metrics.autoscaler_target.labels(name).set(pool.replicas)

    async def poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval(time.monotonic()))
            await self.refresh()

    def interval(self, now: float) -> float:
        """Seconds to the next poll: ``load_poll_interval_s`` while engine calls run or ran in
        the last ``IDLE_AFTER_S``, ``idle_load_poll_interval_s`` when the router is idle. A
        replica that dies while the router is idle is found by the first call to it (its
        connection fails, engine/direct_stream.py) if a poll has not found it first."""
        r = self.router.cfg.router
        busy = any(pool.busy_since(now - IDLE_AFTER_S) for pool in self.router.pools.values())
        return r.load_poll_interval_s if busy else max(r.load_poll_interval_s, r.idle_load_poll_interval_s)

    async def refresh(self) -> None:
        for pool in self.router.pools.values():
            await self._refresh_pool(pool, self.router.cfg.router.load_poll_interval_s)
        self.observe_fleet()
        self.count_kv_transfers()
        self.follow_kv_events()
        if self._autoscaled and time.monotonic() - self._last_serve_poll >= SERVE_POLL_PERIOD_S:
            self._last_serve_poll = time.monotonic()
            await self.poll_pool_sizes()

    async def _refresh_pool(self, pool: "Pool", fresh_s: float) -> None:
        pool.spares.expire()
        try:
            await pool.refresh(fresh_s)
        except Exception as e:  # a pool that cannot be reached is simply unhealthy
            pool.last_error = repr(e)
            logger.warning("load poll of %s failed: %r", pool.name, e)
            for st in pool.replicas.values():
                st.healthy = False
            pool.sweep()
        m = self.metrics
        for st in pool.replicas.values():
            m.replica_kv.labels(pool.name, st.replica_id).set(st.load.get("kv_cache_usage", 0.0))
            m.replica_running.labels(pool.name, st.replica_id).set(st.load.get("running", 0))
            m.replica_waiting.labels(pool.name, st.replica_id).set(st.load.get("waiting", 0))
            m.replica_preemptions.labels(pool.name, st.replica_id).set(st.load.get("preemptions_total", 0))

    def count_kv_transfers(self) -> None:
        """Turns the decode replicas' running KV totals into this router's counters."""
        pool = self.router.pools.get("decode")
        transport = self.router.cfg.kv_transfer.transport
        for st in (pool.replicas.values() if pool else []):
            now = (int(st.load.get("kv_transfer_bytes_total", 0)), float(st.load.get("kv_transfer_seconds_total", 0.0)),
                   int(st.load.get("kv_transfers_total", 0)))
            seen = self._kv_seen.get(st.replica_id, (0, 0.0, 0))
            if now[0] >= seen[0]:  # a restarted replica starts from zero again
                self.metrics.kv_transfer_bytes.labels(transport).inc(now[0] - seen[0])
                self.metrics.kv_transfer_busy.labels(transport).inc(max(0.0, now[1] - seen[1]))
                self.metrics.kv_transfers.labels(transport).inc(max(0, now[2] - seen[2]))
                self.router.disaggregator.measure.transfers(now[2] - seen[2], now[0] - seen[0], now[1] - seen[1])
            self._kv_seen[st.replica_id] = now

    def follow_kv_events(self) -> None:
        """Subscriptions to the engines' KV events as the load reports name them, and the
        decider's inputs for /metrics."""
        r = self.router
        if r.kv_feed is not None:
            r.kv_feed.follow({st.replica_id: st.load.get("kv_events")
                              for pool in r.pools.values() for st in pool.replicas.values()})
        prefill = r.pools.get("prefill")
        r.disaggregator.observe_poll(sum(st.healthy for st in prefill.replicas.values()) if prefill else 0)

    async def poll_pool_sizes(self) -> None:
        """Ray Serve's replica counts per autoscaled pool (what its autoscaler is holding), for /metrics."""
        from ray import serve

        try:
            app = serve.get_replica_context().app_name
            status = await asyncio.to_thread(serve.status)
            deployments = status.applications[app].deployments
        except Exception as e:  # noqa: BLE001 - metrics only; never break serving over them
            logger.debug("serve.status failed: %r", e)
            return
        for name in self._autoscaled & set(self.router.pools):
            d = deployments.get(name)
            if d is not None:
                live = sum(n for state, n in d.replica_states.items()
                           if str(getattr(state, "value", state)) in _LIVE_STATES)
                self.metrics.autoscaler_target.labels(name).set(live)

    def observe_fleet(self) -> None:
        """Feeds the serving (decode or monolithic) pool's KV pressure to admission and the ladder."""
        r = self.router
        pool = r.pools.get("decode" if r.mode == "pd" else "monolithic")
        live = [st for st in pool.replicas.values() if st.healthy] if pool else []
        now = time.monotonic()
        preempted = sum(int(st.load.get("preemptions_total", 0)) for st in live)
        rate = 0.0
        if self._preempt_seen is not None and now > self._preempt_seen[0]:
            rate = max(0, preempted - self._preempt_seen[1]) / (now - self._preempt_seen[0])
        self._preempt_seen = (now, preempted)
        n = len(live)
        fleet = FleetState(
            kv_usage=sum(float(st.load.get("kv_cache_usage", 0.0)) for st in live) / n if n else 0.0,
            kv_capacity_bytes=float(sum(int(st.load.get("kv_capacity_tokens", 0)) for st in live)
                                    * r.kv_bytes_per_token),
            waiting_per_replica=sum(int(st.load.get("waiting", 0)) for st in live) / n if n else 0.0,
            healthy_replicas=n)
        self.metrics.rung.set(r.admission.observe_fleet(fleet, rate))
