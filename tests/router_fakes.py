"""A router (router/app.py RouterServer) over in-memory engine pools, without Ray or vLLM.

Each fake engine is the router-capacity benchmark's stub (bench/stub_engine.py), served on
a real loopback direct stream (engine/direct_stream.py) as an engine replica serves it. The
pools' replica states are filled in by hand (what a load poll would have written), so a test
decides which replica is healthy, dead or silent. Requests go through the router's own HTTP
app in-process (httpx's ASGI transport).
"""
from __future__ import annotations

import asyncio
import json
import socket
from types import SimpleNamespace
from typing import Any, Optional

import httpx

from pdserve.bench.router_capacity import stub_cluster_config
from pdserve.bench.stub_engine import InstantStubEngine
from pdserve.router.app import RouterServer, build_http_app
from pdserve.router.pools import Pool, ReplicaState

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 6,
        "temperature": 0, "ignore_eos": True}


class FakeEngine(InstantStubEngine):
    """A stub engine replica. ``hang_after=N``: after N item batches of a call it goes silent
    (the connection stays open and nothing more arrives), as a partitioned host does."""

    def __init__(self, role: str, replica_id: str, hang_after: Optional[int] = None) -> None:
        super().__init__(role, replica_id=replica_id)
        self.hang_after = hang_after
        self.calls: list[tuple[str, dict]] = []
        self.aborted = 0
        self.reached_hang = asyncio.Event()

    async def generate(self, endpoint, body, replica=None):
        self.calls.append((endpoint, body))
        sent = 0
        try:
            async for batch in super().generate(endpoint, body):
                if self.hang_after is not None and sent >= self.hang_after:
                    self.reached_hang.set()
                    await asyncio.sleep(3600)
                yield batch
                sent += 1
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted += 1
            raise


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeHandle:
    """What a Pool calls on its Ray Serve handle for load polls: each replica's ``load()``,
    or nothing at all from a replica the test has silenced (its host is partitioned)."""

    def __init__(self, name: str, cluster: "FakeCluster") -> None:
        self.deployment_name = name
        self.load = SimpleNamespace(remote=lambda replica=None: cluster.load_of(replica))


class FakeView:
    """The TargetedRequestRouter view a Pool lists live replicas from."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def live_replica_ids(self) -> list[str]:
        return list(self.pool.replicas)


class FakeCluster:
    """Pools of fake engines behind a RouterServer built without its socket or poller.

    ``poll()`` runs one round of the router's own load polls (RouterServer._refresh), with a
    short poll timeout, so a test can walk a replica to unhealthy the way a real poller does."""

    def __init__(self, mode: str = "pd", **cfg_updates: Any) -> None:
        self.cfg = stub_cluster_config(mode, stub_replicas=2)
        if cfg_updates:
            self.cfg = self.cfg.model_copy(update=cfg_updates)
        self.engines: dict[str, FakeEngine] = {}
        self.silent: set[str] = set()
        self.pools = {name: Pool(name, FakeHandle(name, self), poll_timeout_s=0.05) for name in self.cfg.pools()}
        self.router: Optional[RouterServer] = None

    async def load_of(self, replica_id: str) -> dict[str, Any]:
        if replica_id in self.silent or replica_id not in self.engines:
            await asyncio.sleep(3600)
        return self.engines[replica_id].load()

    async def poll(self) -> None:
        from pdserve.router.targeting import POOL_VIEWS

        saved = {name: POOL_VIEWS.get(name) for name in self.pools}
        POOL_VIEWS.update({name: FakeView(pool) for name, pool in self.pools.items()})
        try:
            await (self.router or self.build())._refresh()
        finally:
            for name, view in saved.items():
                if view is None:
                    POOL_VIEWS.pop(name, None)
                else:
                    POOL_VIEWS[name] = view

    async def add(self, pool: str, engine: FakeEngine) -> FakeEngine:
        await engine.start_streams("127.0.0.1")
        self.engines[engine.replica_id] = engine
        self.pools[pool].replicas[engine.replica_id] = ReplicaState(engine.replica_id, load=engine.load())
        return engine

    def add_dead(self, pool: str, replica_id: str) -> None:
        """A replica that died since the last load poll: still listed healthy, nothing listens."""
        load = {"replica": replica_id, "stream": {"host": "127.0.0.1", "port": closed_port(), "token": "t"}}
        self.pools[pool].replicas[replica_id] = ReplicaState(replica_id, load=load)

    def state(self, replica_id: str) -> ReplicaState:
        return next(p.replicas[replica_id] for p in self.pools.values() if replica_id in p.replicas)

    def build(self) -> RouterServer:
        router = RouterServer.__new__(RouterServer)
        router._setup(self.cfg, self.pools)
        self.router = router
        return router

    def client(self) -> httpx.AsyncClient:
        router = self.router or self.build()
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=build_http_app(router)),
                                 base_url="http://router", timeout=30)

    async def close(self) -> None:
        for engine in self.engines.values():
            await engine.streams.close()


def stream_tokens(text: str) -> tuple[list[int], list[dict]]:
    """The token ids of an SSE body, and its parsed events (``{"done": True}`` for [DONE])."""
    ids, events = [], []
    for line in text.splitlines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            events.append({"done": True})
            continue
        chunk = json.loads(line[6:])
        events.append(chunk)
        for choice in chunk.get("choices") or []:
            ids.extend(choice.get("token_ids") or [])
    return ids, events


def run(coro, timeout_s: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))
