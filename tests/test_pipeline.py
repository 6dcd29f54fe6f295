"""The router pipeline (router/pipeline.py) without a cluster: in-memory pools, no socket,
no Ray, no tokenizer. Every path choice and every fallback cause, with the headers and
metrics the cluster tests check on the real thing."""
from __future__ import annotations

import asyncio

import pytest
from router_fakes import CHAT, FakeRequest, MemoryCluster, MemoryEngine, run, stream_tokens

from pdserve.bench.stub_engine import stub_token_ids
from pdserve.fallback.policy import FallbackCause
from pdserve.router.plan import AB_MONOLITHIC, DEGRADED, MONOLITHIC_CLUSTER, PD, choose_plan

STREAM = dict(CHAT, stream=True, return_token_ids=True)  # the client asks for the ids it checks


def metric(counter, *labels) -> float:
    return (counter.labels(*labels) if labels else counter)._value.get()


def observed(c: MemoryCluster, name: str, **labels) -> float:
    """How many observations a histogram has (0 if none)."""
    return c.router.metrics.registry.get_sample_value(f"{name}_count", labels) or 0


def pd_cluster(prefill: dict | None = None, decode: dict | None = None, **router) -> MemoryCluster:
    c = MemoryCluster("pd", **router)
    c.add("prefill", MemoryEngine("prefill", "p0", **(prefill or {})))
    c.add("decode", MemoryEngine("decode", "d0", **(decode or {})))
    c.build()
    return c


def serve(c: MemoryCluster, body=CHAT, **kw):
    return run(c.serve(body, **kw))


def assert_settled(c: MemoryCluster) -> None:
    """Every admitted request released its slot and in-flight gauge."""
    assert metric(c.router.metrics.inflight) == 0
    assert sum(c.router.admission.slots.inflight.values()) == 0
    assert all(st.inflight == 0 for p in c.pools.values() for st in p.replicas.values())


# ---------------------------------------------------------------------------- the plan


def test_choose_plan_covers_every_path():
    never = lambda: pytest.fail("the A/B arm is not asked")  # noqa: E731
    assert choose_plan("pd", "prefill", never) is DEGRADED
    assert choose_plan("monolithic", None, never) is MONOLITHIC_CLUSTER
    assert choose_plan("monolithic", "prefill", never) is DEGRADED
    assert choose_plan("pd", None, lambda: "monolithic") is AB_MONOLITHIC
    assert choose_plan("pd", None, lambda: "pd") is PD
    assert DEGRADED.order == ("prefill", "decode") and AB_MONOLITHIC.order == ("decode", "prefill")


def test_pd_stream_runs_a_prefill_leg_then_a_decode_leg_with_the_lease():
    c = pd_cluster()
    r = serve(c, STREAM)
    assert r.status_code == 200
    h = r.headers
    assert (h["x-pdserve-path"], h["x-pdserve-prefill-replica"], h["x-pdserve-decode-replica"]) == ("pd", "p0", "d0")
    assert "x-pdserve-fallback-cause" not in h and h["x-pdserve-class"]
    ids, events = stream_tokens(r.text)
    assert ids == stub_token_ids(6) and events[-1] == {"done": True}
    (_, pbody), = c.engines["p0"].calls
    assert pbody["max_tokens"] == 1 and pbody["stream"] is False and pbody["kv_transfer_params"]["do_remote_decode"]
    (_, dbody), = c.engines["d0"].calls
    assert dbody["kv_transfer_params"]["stub"] is True and dbody["kv_transfer_params"]["transfer_deadline_s"] > 0
    assert dbody["return_token_ids"] is True and dbody["max_tokens"] == 6
    m = c.router.metrics
    assert metric(m.requests, "pd", "chat", "200") == 1 and observed(c, "pdserve_prefill_leg_seconds") == 1
    assert observed(c, "pdserve_ttft_breakdown_seconds", stage="kv_transfer") == 1
    assert observed(c, "pdserve_ttft_seconds", path="pd", **{"class": "standard"}) == 1
    assert c.router.breakers.states()[("p0", "d0")].value == "closed"
    assert_settled(c)


def test_pd_json_answer_carries_the_timing_breakdown():
    c = pd_cluster()
    r = serve(c)
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
    assert float(r.headers["x-pdserve-prefill-ms"]) >= 0
    assert r.headers["x-pdserve-kv-transfer"] == "ok; ms=0.00; bytes=0"
    assert r.json()["choices"][0]["message"]["content"]
    assert metric(c.router.metrics.slo_requests, "standard", "true") + metric(
        c.router.metrics.slo_requests, "standard", "false") == 1
    assert_settled(c)


def test_monolithic_cluster_serves_whole_on_one_engine():
    c = MemoryCluster("monolithic")
    m0 = c.add("monolithic", MemoryEngine("monolithic", "m0"))
    c.build()
    r = serve(c, STREAM)
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "monolithic"
    assert r.headers["x-pdserve-engine-replica"] == "m0" and "kv_transfer_params" not in m0.calls[0][1]
    assert stream_tokens(r.text)[0] == stub_token_ids(6)
    assert_settled(c)


def test_ab_monolithic_arm_serves_whole_on_decode():
    c = pd_cluster()
    c.router.split.set_fraction(1.0)
    r = serve(c, headers={"x-session-id": "s1"})
    assert r.headers["x-pdserve-arm"] == "monolithic" and r.headers["x-pdserve-path"] == "monolithic"
    assert r.headers["x-pdserve-decode-replica"] == "d0" and not c.engines["p0"].calls
    assert metric(c.router.metrics.ab_requests, "monolithic") == 1


def test_ab_split_off_sets_no_arm_header():
    c = pd_cluster()
    r = serve(c)
    assert "x-pdserve-arm" not in r.headers and r.headers["x-pdserve-path"] == "pd"


def test_ladder_degraded_target_serves_whole_on_prefill():
    c = MemoryCluster("pd")
    c.cfg = c.cfg.model_copy(update={"ladder": c.cfg.ladder.model_copy(update={"degraded_target": "prefill"})})
    p0 = c.add("prefill", MemoryEngine("prefill", "p0"))
    c.add("decode", MemoryEngine("decode", "d0"))
    c.build().admission.ladder.force(3)  # Standard goes to the degraded target
    r = serve(c)
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "monolithic"
    assert r.headers["x-pdserve-degraded"].startswith("degraded-target=prefill")
    assert r.headers["x-pdserve-engine-replica"] == "p0" and "kv_transfer_params" not in p0.calls[0][1]
    assert_settled(c)


# ---------------------------------------------------------------------------- fallback causes


def assert_fallback(c: MemoryCluster, r, cause: FallbackCause, served_by: str) -> None:
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-path"] == "fallback"
    assert r.headers["x-pdserve-fallback-cause"] == cause.value
    key = "x-pdserve-decode-replica" if served_by.startswith("d") else "x-pdserve-engine-replica"
    assert r.headers[key] == served_by
    assert metric(c.router.metrics.fallbacks, cause.value) == 1
    assert metric(c.router.metrics.requests, "fallback", "chat", "200") == 1
    whole = c.engines[served_by].calls[-1][1]
    assert "kv_transfer_params" not in whole  # the untouched request, prefilled locally
    assert_settled(c)


def test_no_prefill_replica():
    c = pd_cluster()
    c.state("p0").healthy = False
    assert_fallback(c, serve(c), FallbackCause.NO_PREFILL_REPLICA, "d0")
    assert not c.engines["p0"].calls


def test_no_decode_replica_runs_whole_on_prefill():
    c = pd_cluster()
    c.state("d0").healthy = False
    assert_fallback(c, serve(c, STREAM), FallbackCause.NO_DECODE_REPLICA, "p0")
    assert not c.engines["d0"].calls


@pytest.mark.parametrize("script", [{"error": 500}, {"raise_first": RuntimeError("boom")}, {"end_after": 0}],
                         ids=["5xx", "raised", "no-answer"])
def test_prefill_error(script):
    c = pd_cluster(prefill=script)
    assert_fallback(c, serve(c), FallbackCause.PREFILL_ERROR, "d0")
    assert c.router.breakers.states()[("p0", "d0")].value == "closed"  # not the link's fault


def test_prefill_4xx_goes_back_to_the_client_as_it_is():
    c = pd_cluster(prefill={"error": 400})
    r = serve(c)
    assert r.status_code == 400 and r.json()["error"]["type"] == "ScriptedError"
    assert r.headers["x-pdserve-prefill-replica"] == "p0" and "x-pdserve-path" not in r.headers
    assert not c.engines["d0"].calls
    assert metric(c.router.metrics.requests, "pd", "chat", "400") == 1
    assert_settled(c)


def test_a_stream_the_prefill_engine_refuses_is_answered_by_the_decode_engine():
    """vLLM's server answers some bad streams 200 with an error event (an out-of-vocabulary
    token id), others 400: the non-streamed prefill leg cannot tell which, so the whole
    request goes to the decode engine, whose serving layer answers as vLLM's does (P/D used
    to answer 400 where vLLM streams)."""
    c = pd_cluster(prefill={"error": 400})
    r = serve(c, STREAM)
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
    ids, events = stream_tokens(r.text)
    assert events[-1] == {"done": True} and ids
    ((endpoint, body),) = c.engines["d0"].calls
    assert "kv_transfer_params" not in body and body["stream"] is True  # whole, not a decode leg
    assert_settled(c)


def test_prefill_timeout():
    c = pd_cluster(prefill={"hang_after": 0}, prefill_timeout_s=0.2, load_poll_interval_s=0.05)
    assert_fallback(c, serve(c), FallbackCause.PREFILL_TIMEOUT, "d0")
    assert c.engines["p0"].aborted == 1  # the prefill call was cancelled


@pytest.mark.parametrize("swept", [True, False], ids=["leg-given-up", "seen-unhealthy"])
def test_prefill_replica_lost(swept):
    c = pd_cluster(prefill={"hang_after": 0}, prefill_timeout_s=30, load_poll_interval_s=0.05)

    async def main():
        task = asyncio.ensure_future(c.serve(CHAT))
        await c.engines["p0"].reached_hang.wait()
        c.state("p0").healthy = False  # its load polls timed out
        if swept:
            c.pools["prefill"].sweep()
        return await task

    assert_fallback(c, run(main()), FallbackCause.PREFILL_REPLICA_LOST, "d0")


def test_prefill_returned_no_kv_params():
    c = pd_cluster(prefill={"no_kv_params": True})
    assert_fallback(c, serve(c), FallbackCause.NO_KV_PARAMS, "d0")


def test_link_circuit_open():
    c = pd_cluster()
    for _ in range(c.cfg.fallback.link_failure_threshold):
        c.router.breakers.begin("p0", "d0")
        c.router.breakers.record("p0", "d0", ok=False)
    assert c.router.breakers.states()[("p0", "d0")].value == "open"
    assert_fallback(c, serve(c), FallbackCause.LINK_OPEN, "d0")
    assert not c.engines["p0"].calls


@pytest.mark.parametrize("kind,cause", [("link", FallbackCause.KV_TRANSFER_FAILED),
                                        (None, FallbackCause.KV_TRANSFER_FAILED),
                                        ("deadline", FallbackCause.KV_DEADLINE)])
def test_kv_transfer_failure_is_a_local_recompute_on_decode(kind, cause):
    c = pd_cluster(decode={"kv_pull": {"ok": False, "kind": kind}})
    r = serve(c)
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "fallback"
    assert r.headers["x-pdserve-fallback-cause"] == cause.value
    assert r.headers["x-pdserve-kv-transfer"] == f"failed; kind={kind}"
    assert r.headers["x-pdserve-decode-replica"] == "d0" and len(c.engines["d0"].calls) == 1
    m = c.router.metrics
    assert metric(m.fallbacks, cause.value) == 1
    assert metric(m.kv_transfer_failures, c.cfg.kv_transfer.transport, kind or "unknown") == 1
    assert c.router.breakers._get("p0", "d0").failures == 1  # the link is charged
    assert_settled(c)


def test_replica_lost_before_the_first_item_moves_the_request_whole():
    c = pd_cluster(decode={"raise_first": ConnectionRefusedError("refused")})
    r = serve(c, STREAM)
    assert_fallback(c, r, FallbackCause.REPLICA_LOST, "p0")
    assert stream_tokens(r.text)[0] == stub_token_ids(6)
    assert [("kv_transfer_params" in b) for _, b in c.engines["p0"].calls] == [True, False]
    assert c.router.breakers.states()[("p0", "d0")].value == "closed"  # the engine died, not the link


def test_replica_lost_with_no_engine_left_is_503():
    def refuse(engine, endpoint, body):  # a refused direct stream marks its replica down at once
        if "kv_transfer_params" not in body or engine.role == "decode":
            c.state(engine.replica_id).healthy = False
            raise ConnectionRefusedError("refused")

    c = pd_cluster(prefill={"before": refuse}, decode={"before": refuse})
    r = serve(c)
    # d0 lost -> whole on p0 (replica_lost) -> p0 lost too -> no healthy engine left
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    assert "retry-after" in r.headers and r.headers["x-pdserve-fallback-cause"] == "replica_lost"
    assert metric(c.router.metrics.requests, "pd", "chat", "503") == 1  # counted on the path it started on
    assert_settled(c)


def test_fallback_with_no_engine_left_is_503():
    def lose_decode(engine, endpoint, body):
        c.state("d0").healthy = False

    c = pd_cluster(prefill={"error": 500, "before": lose_decode})
    r = serve(c)
    assert r.status_code == 503 and "retry-after" in r.headers
    assert "x-pdserve-fallback-cause" not in r.headers  # nothing served it
    assert metric(c.router.metrics.requests, "fallback", "chat", "503") == 1
    assert_settled(c)


# ---------------------------------------------------------------------------- refusals


def test_no_healthy_engine_anywhere_is_an_immediate_503():
    c = pd_cluster()
    c.state("p0").healthy = c.state("d0").healthy = False
    r = serve(c, STREAM)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert not c.engines["p0"].calls and not c.engines["d0"].calls
    assert metric(c.router.metrics.admissions, "standard", "rejected", "no_healthy_engine") == 1


@pytest.mark.parametrize("raw,status", [(b"{not json", 400), (b"[1, 2]", 400)])
def test_bad_bodies_are_refused_before_admission(raw, status):
    c = pd_cluster()
    r = serve(c, raw=raw)
    assert r.status_code == status and r.json()["error"]["code"] == status
    assert metric(c.router.metrics.requests, "none", "chat", str(status)) == 1
    assert not c.engines["p0"].calls


@pytest.mark.parametrize("inline_max,padding,on_loop", [(8192, 0, True), (8192, 9000, False), (0, 0, False)])
def test_a_small_body_is_checked_on_the_event_loop_a_large_one_in_a_thread(inline_max, padding, on_loop):
    import threading

    c = pd_cluster(inline_check_max_bytes=inline_max)
    router = c.build()
    check, threads = router.pipeline.intake.checker.check, []

    def recording_check(endpoint, body):
        threads.append(threading.get_ident())
        return check(endpoint, body)

    router.pipeline.intake.checker.check = recording_check

    async def main():
        body = dict(CHAT, messages=[{"role": "user", "content": "hi" + " " * padding}])
        return await c.serve(body), threading.get_ident()

    r, loop_thread = run(main())
    assert r.status_code == 200 and len(threads) == 1
    assert (threads[0] == loop_thread) is on_loop


def test_unknown_model_is_404():
    c = pd_cluster()
    r = serve(c, dict(CHAT, model="other"))
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"


# ---------------------------------------------------------------------------- relay and resume


def test_a_stream_cut_mid_way_resumes_on_another_engine():
    c = pd_cluster(decode={"break_after": 3})
    r = serve(c, STREAM)
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
    ids, events = stream_tokens(r.text)
    assert len(ids) == 6 and ids[:3] == stub_token_ids(3) and events[-1] == {"done": True}
    assert not any("error" in e for e in events)
    endpoint, body = c.engines["p0"].calls[-1]  # the continuation: prompt + the three tokens sent
    assert endpoint == "completions" and body["prompt"][-3:] == stub_token_ids(3) and body["max_tokens"] == 3
    assert metric(c.router.metrics.stream_resumes, "resumed") == 1
    assert metric(c.router.metrics.requests, "pd", "chat", "200") == 1
    assert_settled(c)


def test_a_stream_that_ends_early_resumes_on_the_only_other_engine():
    c = pd_cluster(decode={"end_after": 3})
    r = serve(c, STREAM)
    ids, events = stream_tokens(r.text)
    assert len(ids) == 6 and ids[:3] == stub_token_ids(3) and events[-1] == {"done": True}
    assert metric(c.router.metrics.stream_resumes, "resumed") == 1


def test_a_stream_that_cannot_resume_ends_with_an_error_event():
    c = pd_cluster(decode={"end_after": 3})
    c.cfg = c.cfg.model_copy(update={"fallback": c.cfg.fallback.model_copy(update={"max_stream_resumes": 0})})
    c.build()
    r = serve(c, STREAM)
    ids, events = stream_tokens(r.text)
    assert r.status_code == 200 and ids == stub_token_ids(3)
    assert events[-2]["error"]["code"] == 503 and events[-1] == {"done": True}
    assert metric(c.router.metrics.stream_resumes, "exhausted") == 1
    assert metric(c.router.metrics.requests, "pd", "chat", "503") == 1
    assert_settled(c)


def test_a_client_gone_mid_stream_aborts_the_engine_call_and_counts_499():
    c = pd_cluster(decode={"hang_after": 2})

    async def main():
        response = await c.router.pipeline.serve("chat", FakeRequest(STREAM))
        it = response.body_iterator
        first = await it.__anext__()
        await c.engines["d0"].reached_hang.wait()
        await it.aclose()  # the client went away
        await asyncio.sleep(0)
        return first

    assert "data: " in run(main())
    assert c.engines["d0"].aborted == 1
    assert metric(c.router.metrics.requests, "pd", "chat", "499") == 1
    assert_settled(c)


# ---------------------------------------------------------------------------- a whole stream's head


def mono_cluster(m0: dict | None = None, spare: bool = True, **router) -> MemoryCluster:
    """m0 serves first; m1 (if ``spare``) is busier, there to take a request m0 loses."""
    c = MemoryCluster("monolithic", **router)
    c.add("monolithic", MemoryEngine("monolithic", "m0", **(m0 or {})))
    if spare:
        c.add("monolithic", MemoryEngine("monolithic", "m1"))
    c.build()
    if spare:
        c.state("m1").load["running"] = 50
    return c


def test_a_whole_stream_answers_its_status_and_headers_while_its_engine_prefills():
    c = mono_cluster({"hang_after": 0})  # accepts the stream (its head), then never answers

    async def main():
        response = await c.router.pipeline.serve("chat", FakeRequest(STREAM))
        prefilling = c.engines["m0"].reached_hang.is_set()
        read = asyncio.ensure_future(response.body_iterator.__anext__())  # as Starlette reads it
        await asyncio.sleep(0.05)
        read.cancel()  # the client goes away before its first token
        await asyncio.gather(read, return_exceptions=True)
        await response.body_iterator.aclose()
        return response, prefilling

    r, prefilling = run(main())
    assert prefilling and r.status_code == 200 and r.media_type == "text/event-stream"
    assert r.headers["x-pdserve-path"] == "monolithic" and r.headers["x-pdserve-engine-replica"] == "m0"
    assert c.engines["m0"].aborted == 1  # the engine request ends with the client
    assert metric(c.router.metrics.requests, "monolithic", "chat", "499") == 1
    assert_settled(c)


def test_a_stream_lost_after_its_head_is_served_again_whole_not_resumed():
    c = mono_cluster({"break_after": 0})
    r = serve(c, STREAM)
    ids, events = stream_tokens(r.text)
    assert r.status_code == 200 and ids == stub_token_ids(6) and events[-1] == {"done": True}
    assert [endpoint for endpoint, _ in c.engines["m1"].calls] == ["chat"]  # the request itself, no continuation
    assert c.engines["m1"].calls[0][1]["messages"] == STREAM["messages"]
    m = c.router.metrics
    assert metric(m.fallbacks, FallbackCause.REPLICA_LOST.value) == 1
    assert metric(m.requests, "fallback", "chat", "200") == 1
    assert metric(m.stream_resumes, "resumed") == 0
    assert_settled(c)


def test_an_engine_silent_after_its_head_is_given_up_after_the_request_timeout():
    c = mono_cluster({"hang_after": 0}, request_timeout_s=0.3)
    r = serve(c, STREAM)
    assert r.status_code == 200 and stream_tokens(r.text)[0] == stub_token_ids(6)
    assert c.engines["m0"].aborted == 1 and len(c.engines["m1"].calls) == 1
    assert metric(c.router.metrics.fallbacks, FallbackCause.REPLICA_LOST.value) == 1
    assert_settled(c)


def test_a_stream_lost_after_its_head_with_no_engine_left_ends_with_an_error_event():
    c = mono_cluster({"break_after": 0}, spare=False)
    r = serve(c, STREAM)
    _, events = stream_tokens(r.text)
    assert r.status_code == 200  # sent with the head, as vLLM's server sends it before its engine answers
    assert events[0]["error"]["code"] == 503 and events[-1] == {"done": True}
    assert metric(c.router.metrics.requests, "monolithic", "chat", "503") == 1
    assert metric(c.router.metrics.stream_resumes, "exhausted") == 1
    assert_settled(c)


def test_a_client_gone_before_its_stream_started_still_releases_the_request():
    """The client leaves before Starlette writes the status line: Starlette cancels the
    response without ever starting its body, so the stream's own cleanup never runs; the
    request must still be aborted in the engine and released."""
    c = mono_cluster({"hang_after": 0})

    async def gone():
        return {"type": "http.disconnect"}

    async def send(message):
        await asyncio.sleep(0)  # a write that yields to the loop

    async def main():
        response = await c.router.pipeline.serve("chat", FakeRequest(STREAM))
        await response({"type": "http", "asgi": {"spec_version": "2.3"}}, gone, send)
        await asyncio.sleep(0)

    run(main())
    assert c.engines["m0"].aborted == 1
    assert metric(c.router.metrics.requests, "monolithic", "chat", "499") == 1
    assert_settled(c)
