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


def is_head(batch: list) -> bool:
    """A batch that only says the stream was accepted (its ``head``): no engine output yet."""
    return all(item[0] in ("meta", "head") for item in batch) and any(item[0] == "head" for item in batch)


class FakeEngine(InstantStubEngine):
    """A stub engine replica. ``hang_after=N``: after N item batches of a call (its head, if it
    sends one, not counted) it goes silent (the connection stays open and nothing more
    arrives), as a partitioned host does."""

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
                if self.hang_after is not None and sent >= self.hang_after and not is_head(batch):
                    self.reached_hang.set()
                    await asyncio.sleep(3600)
                yield batch
                sent += not is_head(batch)
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


# ---------------------------------------------------------------------------- in-memory pools
# The router pipeline (router/pipeline.py) over pools whose engine calls never leave the
# process: no socket, no Ray, no tokenizer. A pool reaches a MemoryEngine the way it
# reaches a replica without a direct stream (token_stream: ray): ``handle.options(stream=True)
# .generate.remote(...)`` returns a call object with ``__anext__`` and ``cancel()``.


class MemoryEngine(FakeEngine):
    """A stub engine replica with scripted failures, called in memory.

    error=STATUS: answers one engine error item. raise_first=EXC: the call raises EXC before
    any item (a refused or dropped connection). break_after=N: N batches (a head not counted),
    then the call raises ConnectionResetError (a stream cut). end_after=N: N batches, then the
    stream just ends (no [DONE]). no_kv_params: a prefill answer without kv_transfer_params.
    kv_pull={...}: the decode engine's KV pull report. before(engine, endpoint, body): runs
    first on every call."""

    def __init__(self, role: str, replica_id: str, *, hang_after: Optional[int] = None, error: Optional[int] = None,
                 raise_first: Optional[BaseException] = None, break_after: Optional[int] = None,
                 end_after: Optional[int] = None, no_kv_params: bool = False,
                 kv_pull: Optional[dict] = None, before=None) -> None:
        super().__init__(role, replica_id, hang_after=hang_after)
        self.error, self.raise_first, self.break_after, self.end_after = error, raise_first, break_after, end_after
        self.no_kv_params, self.kv_pull, self.before = no_kv_params, kv_pull, before

    async def generate(self, endpoint, body, replica=None):
        if self.before is not None:
            self.before(self, endpoint, body)
        if self.raise_first is not None:
            self.calls.append((endpoint, body))
            raise self.raise_first
        if self.error is not None:
            from pdserve.engine.errors import error_body

            self.calls.append((endpoint, body))
            yield [("meta", {"replica": self.replica_id}), ("error", self.error, error_body(self.error, "scripted",
                                                                                             "ScriptedError"))]
            return
        sent = 0
        async for batch in super().generate(endpoint, body):
            if not is_head(batch):
                if self.end_after is not None and sent >= self.end_after:
                    return
                if self.break_after is not None and sent >= self.break_after:
                    raise ConnectionResetError("scripted stream cut")
                sent += 1
            yield [self._script(item) for item in batch]

    def _script(self, item: tuple) -> tuple:
        if item[0] == "kv" and self.kv_pull is not None:
            return ("kv", dict(self.kv_pull))
        if item[0] == "json" and self.no_kv_params:
            return ("json", dict(item[1], kv_transfer_params=None))
        return item


class MemoryCall:
    """One in-memory engine call, as a Ray streaming call looks to a pool: ``cancel()``
    stops the engine's generator (which counts it in ``aborted``)."""

    def __init__(self, batches) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(batches))
        self.cancelled = False

    async def _pump(self, batches) -> None:
        try:
            async for batch in batches:
                self._queue.put_nowait(("batch", batch))
            self._queue.put_nowait(("end", None))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            self._queue.put_nowait(("error", e))

    async def __anext__(self):
        kind, value = await self._queue.get()
        if kind == "batch":
            return value
        self._queue.put_nowait((kind, value))  # every later read sees the same end
        if kind == "end":
            raise StopAsyncIteration
        raise value

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


class MemoryHandle:
    """A pool's Ray Serve handle, served by the MemoryEngines of a MemoryCluster."""

    def __init__(self, name: str, cluster: "MemoryCluster") -> None:
        self.deployment_name = name
        self.cluster = cluster
        self.load = SimpleNamespace(remote=lambda replica=None: cluster.load_of(replica))

    def options(self, **kwargs):
        def remote(endpoint, body, replica=None):
            call = MemoryCall(self.cluster.engines[replica].generate(endpoint, body))
            self.cluster.calls.append(call)
            return call

        return SimpleNamespace(generate=SimpleNamespace(remote=remote))


class FakeChecker:
    """The request checker without a tokenizer: about four characters a token."""

    def __init__(self, served_name: str = "tiny", max_model_len: int = 2048) -> None:
        self.served_name = served_name
        self.max_model_len = max_model_len

    def check(self, endpoint: str, body: dict):
        from pdserve.router.protocol import ApiError, CheckedRequest

        if not isinstance(body, dict):  # the real checker refuses it with vLLM's request model
            raise ApiError(400, "the body is not a JSON object", "Bad Request", "body")
        model = body.get("model", self.served_name)
        if model != self.served_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        text = json.dumps(body.get("messages") if endpoint == "chat" else body.get("prompt"))
        prompt_tokens = max(1, len(text) // 4)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or self.max_model_len - prompt_tokens
        return CheckedRequest(body=body, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                              stream=bool(body.get("stream")))


class FakeRequest:
    """What the pipeline reads of an HTTP request: headers (a JSON content type unless given)
    and the raw body."""

    def __init__(self, body: Any = None, headers: Optional[dict] = None, raw: Optional[bytes] = None) -> None:
        self.headers = {"content-type": "application/json", **(headers or {})}
        self._raw = raw if raw is not None else json.dumps(body).encode()

    async def body(self) -> bytes:
        return self._raw


class MemoryCluster:
    """A router core (router/core.py Router) over in-memory pools: no socket, no Ray, no
    tokenizer. Replica states are filled in by hand, as a load poll would write them."""

    def __init__(self, mode: str = "pd", **router_updates: Any) -> None:
        self.cfg = stub_cluster_config(mode, stub_replicas=2, token_stream="ray")
        if router_updates:
            self.cfg = self.cfg.model_copy(update={"router": self.cfg.router.model_copy(update=router_updates)})
        self.engines: dict[str, MemoryEngine] = {}
        self.calls: list[MemoryCall] = []
        self.pools = {name: Pool(name, MemoryHandle(name, self), poll_timeout_s=0.05, direct_streams=False)
                      for name in self.cfg.pools()}
        self.router = None

    async def load_of(self, replica_id: str) -> dict[str, Any]:
        return self.engines[replica_id].load()

    def add(self, pool: str, engine: MemoryEngine) -> MemoryEngine:
        self.engines[engine.replica_id] = engine
        self.pools[pool].replicas[engine.replica_id] = ReplicaState(engine.replica_id, load=engine.load())
        return engine

    def state(self, replica_id: str) -> ReplicaState:
        return next(p.replicas[replica_id] for p in self.pools.values() if replica_id in p.replicas)

    def build(self):
        from pdserve.router.core import Router

        self.router = Router(self.cfg, self.pools, FakeChecker(), kv_bytes_per_token=1024)
        return self.router

    async def serve(self, body: dict, endpoint: str = "chat", headers: Optional[dict] = None,
                    raw: Optional[bytes] = None) -> "Answer":
        router = self.router or self.build()
        response = await router.pipeline.serve(endpoint, FakeRequest(body, headers, raw))
        return await Answer.read(response)


class Answer:
    """A pipeline response, read to its end: status, headers and body text."""

    def __init__(self, status: int, headers: dict[str, str], text: str) -> None:
        self.status_code, self.headers, self.text = status, headers, text

    @classmethod
    async def read(cls, response) -> "Answer":
        if hasattr(response, "body_iterator"):
            parts = [c if isinstance(c, str) else c.decode() async for c in response.body_iterator]
            text = "".join(parts)
        else:
            text = response.body.decode()
        return cls(response.status_code, dict(response.headers), text)

    def json(self) -> Any:
        return json.loads(self.text)


def vllm_rejection(endpoint: str, body: dict) -> Optional[str]:
    """What vLLM's own serving layer says about ``body`` (None if it accepts it): its request
    model, then the sampling parameters it builds (where min_tokens, n and the like are
    checked). The max_tokens it passes is the body's, or a default."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    model = ChatCompletionRequest if endpoint == "chat" else CompletionRequest
    try:
        req = model.model_validate(body)
        limit = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        req.to_sampling_params(limit, {})
    except (ValidationError, VLLMValidationError) as e:
        return str(e)
    return None


class VllmCheckedEngine(MemoryEngine):
    """A MemoryEngine that answers 400, as vLLM's server would, to a body vLLM refuses."""

    async def generate(self, endpoint, body, replica=None):
        message = vllm_rejection(endpoint, body)
        if message is None:
            async for batch in super().generate(endpoint, body, replica):
                yield batch
            return
        from pdserve.engine.errors import error_body

        self.calls.append((endpoint, body))
        yield [("meta", {"replica": self.replica_id}), ("error", 400, error_body(400, message, "BadRequestError"))]
