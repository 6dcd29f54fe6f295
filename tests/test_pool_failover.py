"""No pool is a single point of stall: the router over fake engine pools (no Ray, no vLLM).

A pool with no healthy replica is never sent a call (Ray Serve would hold it until it
restarts one): P/D without a decode replica runs whole on a prefill engine, the A/B
monolithic arm and the ladder's degraded target go to the other pool, and a cluster with
no healthy engine at all answers 503 at once. A replica whose direct stream is refused is
marked unhealthy at once.
"""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from router_fakes import CHAT, FakeCluster, FakeEngine, closed_port, run, stream_tokens

from pdserve.bench.stub_engine import stub_token_ids
from pdserve.engine.direct_stream import DirectStream, StreamBroken
from pdserve.router.pools import Pool, ReplicaState


def _fallbacks(router, cause: str) -> float:
    return router.metrics.fallbacks.labels(cause)._value.get()


def test_without_a_decode_replica_pd_runs_whole_on_prefill_and_returns_to_pd_by_itself():
    async def main():
        c = FakeCluster()
        p0 = await c.add("prefill", FakeEngine("prefill", "p0"))
        d0 = await c.add("decode", FakeEngine("decode", "d0"))
        c.state("d0").healthy = False  # its only replica was killed, or its host is gone
        async with c.client() as http:
            r1 = await http.post("/v1/chat/completions", json=dict(CHAT, stream=True, return_token_ids=True))
            r2 = await http.post("/v1/chat/completions", json=CHAT)
            calls_while_down = (len(p0.calls), len(d0.calls))
            c.state("d0").healthy = True  # a decode replica is healthy again (next load poll)
            r3 = await http.post("/v1/chat/completions", json=dict(CHAT, stream=True, return_token_ids=True))
        await c.close()
        return c.router, r1, r2, r3, calls_while_down, p0, d0

    router, r1, r2, r3, calls_while_down, p0, d0 = run(main())
    for r in (r1, r2):
        assert r.status_code == 200, r.text
        assert r.headers["x-pdserve-path"] == "fallback"
        assert r.headers["x-pdserve-fallback-cause"] == "no_decode_replica"
        assert r.headers["x-pdserve-engine-replica"] == "p0"
    assert stream_tokens(r1.text)[0] == stub_token_ids(6)
    assert r2.json()["choices"][0]["message"]["content"]
    # whole requests on the prefill engine (no prefill leg: no kv_transfer_params), none to decode
    assert calls_while_down == (2, 0)
    assert all("kv_transfer_params" not in body for _, body in p0.calls[:2])
    assert _fallbacks(router, "no_decode_replica") == 2
    assert r3.status_code == 200 and r3.headers["x-pdserve-path"] == "pd"
    assert r3.headers["x-pdserve-decode-replica"] == "d0" and len(d0.calls) == 1


def test_no_healthy_engine_anywhere_is_an_immediate_503_with_retry_after():
    async def main():
        c = FakeCluster()
        engines = [await c.add("prefill", FakeEngine("prefill", "p0")),
                   await c.add("decode", FakeEngine("decode", "d0"))]
        for rid in ("p0", "d0"):
            c.state(rid).healthy = False
        async with c.client() as http:
            streamed = await http.post("/v1/chat/completions", json=dict(CHAT, stream=True, return_token_ids=True))
            plain = await http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        await c.close()
        return streamed, plain, engines

    streamed, plain, engines = run(main())
    for r in (streamed, plain):
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["type"] == "ServiceUnavailableError" and err["code"] == 503 and "healthy" in err["message"]
    assert all(not e.calls for e in engines)


def test_monolithic_cluster_without_a_healthy_engine_answers_503_at_once():
    async def main():
        c = FakeCluster("monolithic")
        m0 = await c.add("monolithic", FakeEngine("monolithic", "m0"))
        c.state("m0").healthy = False
        async with c.client() as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
        await c.close()
        return r, m0

    r, m0 = run(main())
    assert r.status_code == 503 and "retry-after" in r.headers and not m0.calls


def test_ab_monolithic_arm_never_sends_to_an_empty_decode_pool():
    async def main():
        c = FakeCluster()
        p0 = await c.add("prefill", FakeEngine("prefill", "p0"))
        await c.add("decode", FakeEngine("decode", "d0"))
        c.build().split.set_fraction(1.0)  # every session on the monolithic arm
        c.state("d0").healthy = False
        async with c.client() as http:
            r = await http.post("/v1/chat/completions", json=CHAT, headers={"x-session-id": "s1"})
        await c.close()
        return r, p0

    r, p0 = run(main())
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-arm"] == "monolithic" and r.headers["x-pdserve-path"] == "monolithic"
    assert r.headers["x-pdserve-engine-replica"] == "p0" and len(p0.calls) == 1


def test_ladder_degraded_target_never_sends_to_an_empty_prefill_pool():
    async def main():
        c = FakeCluster()
        c.cfg = c.cfg.model_copy(update={"ladder": c.cfg.ladder.model_copy(update={"degraded_target": "prefill"})})
        await c.add("prefill", FakeEngine("prefill", "p0"))
        d0 = await c.add("decode", FakeEngine("decode", "d0"))
        c.build().admission.ladder.force(3)  # Standard goes to the degraded target
        c.state("p0").healthy = False
        async with c.client() as http:
            r = await http.post("/v1/chat/completions", json=CHAT)
        await c.close()
        return r, d0

    r, d0 = run(main())
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-degraded"].startswith("degraded-target=prefill")
    assert r.headers["x-pdserve-decode-replica"] == "d0" and len(d0.calls) == 1


def test_a_refused_decode_replica_is_unhealthy_at_once_and_the_request_still_served():
    async def main():
        c = FakeCluster()
        p0 = await c.add("prefill", FakeEngine("prefill", "p0"))
        c.add_dead("decode", "d0")  # SIGKILLed since the last load poll
        async with c.client() as http:
            r1 = await http.post("/v1/chat/completions", json=dict(CHAT, stream=True, return_token_ids=True))
            healthy_after = c.state("d0").healthy
            r2 = await http.post("/v1/chat/completions", json=dict(CHAT, stream=True, return_token_ids=True))
        await c.close()
        return c.router, r1, r2, healthy_after, p0

    router, r1, r2, healthy_after, p0 = run(main())
    assert not healthy_after
    assert r1.status_code == 200 and r1.headers["x-pdserve-path"] == "fallback"
    assert r1.headers["x-pdserve-fallback-cause"] == "replica_lost"
    assert stream_tokens(r1.text)[0] == stub_token_ids(6)
    # the next request does not pick it: no prefill leg, the whole request on prefill
    assert r2.status_code == 200 and r2.headers["x-pdserve-fallback-cause"] == "no_decode_replica"
    assert _fallbacks(router, "replica_lost") == 1
    # the first request's prefill leg, then its whole request; then the second's whole request
    assert [("kv_transfer_params" in body) for _, body in p0.calls] == [True, False, False]


def test_a_refused_direct_connection_marks_the_replica_down_without_calling_through_ray():
    pool = Pool("decode", SimpleNamespace(deployment_name="decode"))  # no Ray handle to call through
    pool.replicas["d0"] = ReplicaState("d0", load={"stream": {"host": "127.0.0.1", "port": closed_port(),
                                                              "token": "t"}})

    async def main():
        stream = pool.stream("d0", "chat", {})
        assert isinstance(stream, DirectStream)
        try:
            await stream.__anext__()
        except StreamBroken as e:
            return e
        return None

    assert isinstance(asyncio.run(main()), StreamBroken)
    assert not pool.is_healthy("d0") and not pool.has_healthy()
