"""Streams never hang on a silent peer (no Ray, no vLLM).

A partitioned engine host drops packets without a reset: the router's read of that leg
would block until TCP gives up. The router gives the leg up as soon as its load polls mark
the replica unhealthy (two poll timeouts): before the first item the request is served by
fallback elsewhere, mid-stream the stream resumes elsewhere from the tokens already sent.
Both ends of each direct stream also run TCP keepalive with TCP_USER_TIMEOUT, so the
kernel ends a connection to a dead peer within seconds.
"""
from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from router_fakes import CHAT, FakeCluster, FakeEngine, run, stream_tokens

from pdserve.bench.stub_engine import stub_token_ids
from pdserve.engine import direct_stream
from pdserve.engine.direct_stream import DirectStream, StreamServer


async def _walk_to_unhealthy(c: FakeCluster, replica_id: str, task: asyncio.Task) -> bool:
    """Silence the replica's load polls; poll until it is unhealthy. Returns whether the
    request was still waiting after the first (tolerated) poll timeout."""
    c.silent.add(replica_id)
    await c.poll()
    waiting_after_one_timeout = c.state(replica_id).healthy and not task.done()
    await c.poll()
    assert not c.state(replica_id).healthy
    return waiting_after_one_timeout


def test_decode_silent_before_its_first_item_falls_back_to_another_engine():
    async def main():
        c = FakeCluster()
        p0 = await c.add("prefill", FakeEngine("prefill", "p0"))
        d0 = await c.add("decode", FakeEngine("decode", "d0", hang_after=0))
        async with c.client() as http:
            task = asyncio.create_task(http.post("/v1/chat/completions", json=dict(CHAT, stream=True, return_token_ids=True)))
            await d0.reached_hang.wait()
            still_waiting = await _walk_to_unhealthy(c, "d0", task)
            r = await task
        await c.close()
        return c, r, still_waiting, p0, d0

    c, r, still_waiting, p0, d0 = run(main())
    assert still_waiting  # one late poll is not enough to give a replica up
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-path"] == "fallback" and r.headers["x-pdserve-fallback-cause"] == "replica_lost"
    assert r.headers["x-pdserve-engine-replica"] == "p0"
    assert stream_tokens(r.text)[0] == stub_token_ids(6)
    assert [("kv_transfer_params" in body) for _, body in p0.calls] == [True, False]  # prefill leg, then whole
    assert d0.aborted == 1  # the router closed its side of the silent call
    # the breaker is not charged for a dead engine
    assert all(state.value == "closed" for state in c.router.breakers.states().values())


def test_decode_silent_mid_stream_resumes_from_the_tokens_sent():
    async def main():
        c = FakeCluster()
        p0 = await c.add("prefill", FakeEngine("prefill", "p0"))
        d0 = await c.add("decode", FakeEngine("decode", "d0", hang_after=2))  # two tokens, then silence
        async with c.client() as http:
            task = asyncio.create_task(http.post("/v1/chat/completions", json=dict(CHAT, stream=True, return_token_ids=True)))
            await d0.reached_hang.wait()
            await _walk_to_unhealthy(c, "d0", task)
            r = await task
        await c.close()
        return c, r, p0

    c, r, p0 = run(main())
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
    ids, events = stream_tokens(r.text)
    assert events[-1] == {"done": True} and not any("error" in e for e in events)
    assert len(ids) == 6 and ids[:2] == stub_token_ids(2)
    # the continuation on the prefill engine (the only other one): prompt + the two tokens sent
    endpoint, body = p0.calls[-1]
    assert endpoint == "completions" and body["prompt"][-2:] == stub_token_ids(2) and body["max_tokens"] == 4
    assert c.router.metrics.stream_resumes.labels("resumed")._value.get() == 1


def test_monolithic_engine_silent_mid_stream_resumes_on_another():
    async def main():
        c = FakeCluster("monolithic")
        m0 = await c.add("monolithic", FakeEngine("monolithic", "m0", hang_after=3))
        m1 = await c.add("monolithic", FakeEngine("monolithic", "m1"))
        c.state("m1").load["running"] = 50  # so the request starts on m0
        async with c.client() as http:
            task = asyncio.create_task(http.post("/v1/completions", json={
                "model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True, "ignore_eos": True,
                "return_token_ids": True}))
            await m0.reached_hang.wait()
            await _walk_to_unhealthy(c, "m0", task)
            r = await task
        await c.close()
        return r, m1

    r, m1 = run(main())
    ids, events = stream_tokens(r.text)
    assert r.status_code == 200 and events[-1] == {"done": True} and len(ids) == 5
    assert m1.calls and m1.calls[-1][1]["prompt"][-3:] == stub_token_ids(3)


def test_prefill_silent_is_still_prefill_replica_lost():
    async def main():
        c = FakeCluster()
        p0 = await c.add("prefill", FakeEngine("prefill", "p0", hang_after=0))
        await c.add("decode", FakeEngine("decode", "d0"))
        async with c.client() as http:
            task = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
            await p0.reached_hang.wait()
            await _walk_to_unhealthy(c, "p0", task)
            r = await task
        await c.close()
        return r

    r = run(main())
    assert r.status_code == 200
    assert r.headers["x-pdserve-path"] == "fallback" and r.headers["x-pdserve-fallback-cause"] == "prefill_replica_lost"


def test_a_leg_on_a_replica_that_stays_healthy_is_left_alone():
    async def main():
        c = FakeCluster()
        await c.add("prefill", FakeEngine("prefill", "p0"))
        d0 = await c.add("decode", FakeEngine("decode", "d0", hang_after=1))  # a slow, live engine
        async with c.client() as http:
            task = asyncio.create_task(http.post("/v1/chat/completions", json=dict(CHAT, stream=True, return_token_ids=True)))
            await d0.reached_hang.wait()
            for _ in range(3):
                await c.poll()  # it answers its polls
            waiting = not task.done()
            task.cancel()
        await c.close()
        return waiting, d0

    waiting, d0 = run(main())
    assert waiting and d0.aborted == 1  # cancelling the client request aborted the engine call


# ---------------------------------------------------------------------------- TCP keepalive


def _options(sock) -> dict[str, int]:
    return {"keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            "keepidle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)}


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
def test_both_ends_of_a_direct_stream_detect_a_dead_peer(monkeypatch):
    tuned = []
    real = direct_stream.detect_dead_peer

    def spy(sock):
        real(sock)
        tuned.append(_options(sock))

    monkeypatch.setattr(direct_stream, "detect_dead_peer", spy)

    async def serve(endpoint, body):
        yield [("sse", "x")]

    async def main():
        srv = StreamServer(serve, "127.0.0.1")
        await srv.start()
        # a router on another host: the replica's Unix socket is not in its network namespace
        tcp = {k: v for k, v in srv.address().items() if k != "unix"}
        got = [b async for b in DirectStream(tcp, "chat", {})]
        tuned_over_tcp = list(tuned)
        got += [b async for b in DirectStream(srv.address(), "chat", {})]  # a router on the replica's host
        await srv.close()
        return got, tuned_over_tcp

    got, tuned_over_tcp = run(main())
    assert got == [[("sse", "x")]] * 2
    want = {"keepalive": 1, "user_timeout_ms": int(direct_stream.DEAD_PEER_TIMEOUT_S * 1000),
            "keepidle": direct_stream.KEEPALIVE_IDLE_S}
    assert tuned_over_tcp == [want, want]  # the router's socket and the replica's
    # over the same host's Unix socket nothing to tune: the kernel closes a dead process's sockets
    assert tuned == tuned_over_tcp
    assert direct_stream.DEAD_PEER_TIMEOUT_S <= 10


def test_the_replica_aborts_the_call_when_its_router_connection_errors():
    """A reset (or, for a partitioned router, the kernel's timeout) ends the call in the engine."""
    aborted = []

    async def serve(endpoint, body):
        try:
            yield [("sse", "x")]
            await asyncio.sleep(3600)
        except (asyncio.CancelledError, GeneratorExit):
            aborted.append(True)
            raise

    async def main():
        srv = StreamServer(serve, "127.0.0.1")
        await srv.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(direct_stream.encode_frame({"token": srv.address()["token"], "endpoint": "chat", "body": {}}))
        await reader.readexactly(4)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST: the replica's read fails with an error, not EOF
        for _ in range(200):
            if aborted and srv.active == 0:
                break
            await asyncio.sleep(0.01)
        await srv.close()
        return srv.active

    assert run(main()) == 0 and aborted == [True]


def test_a_ray_streamed_leg_is_given_up_too():
    """token_stream: ray. Ray's own cancel may wait on the lost replica, so the read is raced."""
    from types import SimpleNamespace

    from pdserve.engine.leg import Leg, LegLost
    from pdserve.router.pools import Pool, ReplicaState

    class RayCall:
        def __init__(self):
            self.sent = False
            self.cancelled = False

        async def __anext__(self):
            if not self.sent:
                self.sent = True
                return [("meta", {"replica": "d0"}), ("sse", "data: one\n\n")]
            await asyncio.sleep(3600)  # the replica's host went silent

        def cancel(self):
            self.cancelled = True  # and Ray's cancel does not end the read

    call = RayCall()
    handle = SimpleNamespace(deployment_name="decode",
                             options=lambda **kw: SimpleNamespace(generate=SimpleNamespace(
                                 remote=lambda *a, **k: call)))
    pool = Pool("decode", handle, direct_streams=False)
    pool.replicas["d0"] = ReplicaState("d0")

    async def main():
        leg = Leg(pool, "d0", "chat", {})
        first = await leg.next_item()
        read = asyncio.create_task(leg.next_item())
        await asyncio.sleep(0.05)
        assert not read.done()
        pool.replicas["d0"].healthy = False
        pool.sweep()
        with pytest.raises(LegLost):
            await read
        return first

    assert run(main()) == ("sse", "data: one\n\n") and call.cancelled
