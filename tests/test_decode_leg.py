"""The decode leg (decode/leg.py), local recompute, and the stream relay with mid-stream
resume (decode/relay.py) alone, over in-memory pools."""
from __future__ import annotations


import pytest
from router_fakes import CHAT, MemoryCluster, MemoryEngine, run, stream_tokens

from pdserve.bench.stub_engine import stub_token_ids
from pdserve.decode.leg import breakdown_headers, decode_body, recompute_cause, start_decode, ttft_stages
from pdserve.decode.relay import StreamRelay, carries_token
from pdserve.engine.leg import Leg
from pdserve.fallback.policy import FallbackCause

STREAM = dict(CHAT, stream=True, return_token_ids=True)


def test_decode_body_is_the_clients_plus_the_lease():
    body = dict(CHAT)
    assert decode_body(body, {"k": 1}) == dict(CHAT, kv_transfer_params={"k": 1}) and "kv_transfer_params" not in body


@pytest.mark.parametrize("pull,cause", [
    (None, None), ({"ok": True, "seconds": 0.1, "bytes": 10}, None),
    ({"ok": False, "kind": "deadline"}, FallbackCause.KV_DEADLINE),
    ({"ok": False, "kind": "link"}, FallbackCause.KV_TRANSFER_FAILED),
    ({"ok": False}, FallbackCause.KV_TRANSFER_FAILED)])
def test_a_failed_pull_is_a_local_recompute_named_by_its_kind(pull, cause):
    assert recompute_cause(pull) is cause


def test_breakdown_headers():
    assert breakdown_headers(None, None) == {}
    assert breakdown_headers(0.0123, {"ok": True, "seconds": 0.002, "bytes": 42, "same_host": True}) == {
        "x-pdserve-prefill-ms": "12.30", "x-pdserve-kv-transfer": "ok; ms=2.00; bytes=42; mode=same-host"}
    assert breakdown_headers(0.001, {"ok": True, "seconds": 0, "bytes": 1, "same_host": False})[
        "x-pdserve-kv-transfer"] == "ok; ms=0.00; bytes=1; mode=inline"
    assert breakdown_headers(None, {"ok": False, "kind": "link"}) == {"x-pdserve-kv-transfer": "failed; kind=link"}


def test_ttft_stages_split_the_first_token_time():
    assert ttft_stages(None, None, 1.0, 0.1) == []
    assert ttft_stages(0.2, {"ok": True, "seconds": 0.3}, 1.0, 0.1) == [
        ("queue", 0.1), ("prefill", 0.2), ("kv_transfer", 0.3), ("decode_first_token", pytest.approx(0.4))]
    assert ttft_stages(0.2, {"ok": False}, 0.25, 0.1) == [("queue", 0.1), ("prefill", 0.2),
                                                          ("decode_first_token", 0.0)]


def test_carries_token():
    assert carries_token('data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
    assert carries_token('data: {"choices":[{"text":" a"}]}\n\n')
    assert not carries_token('data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
    assert not carries_token("data: [DONE]\n\n")


def _decode_pool(**script):
    c = MemoryCluster("pd")
    d0 = c.add("decode", MemoryEngine("decode", "d0", **script))
    p0 = c.add("prefill", MemoryEngine("prefill", "p0"))
    return c, d0, p0


async def _relay(c: MemoryCluster, leg: Leg, respawn, max_resumes: int = 2):
    resumes = []
    relay = StreamRelay("chat", leg, STREAM, served_name="tiny", max_resumes=max_resumes, t0=0.0,
                        respawn=respawn, on_resume=resumes.append)
    first = await leg.next_item()  # a whole request's stream: its head (the router's first item)
    text = "".join([t async for t in relay.run(None if first[0] == "head" else first[1])])
    return relay, text, resumes


def test_the_decode_leg_reports_its_pull_and_relays_every_token():
    c, d0, _ = _decode_pool(kv_pull={"ok": True, "seconds": 0.01, "bytes": 7})

    async def main():
        leg = start_decode(c.pools["decode"], "d0", "chat", STREAM, {"k": 1}, prefill_s=0.05, link=("p0", "d0"))
        return leg, await _relay(c, leg, respawn=lambda dead, body: None)

    leg, (relay, text, resumes) = run(main())
    assert d0.calls[0][1]["kv_transfer_params"] == {"k": 1}
    assert leg.kv_pull == {"ok": True, "seconds": 0.01, "bytes": 7} and leg.link == ("p0", "d0")
    assert stream_tokens(text)[0] == stub_token_ids(6) and relay.tokens == 6 and relay.completed
    assert relay.status == "200" and relay.ttft is not None and resumes == []


@pytest.mark.parametrize("script", [{"break_after": 2}, {"end_after": 2}])
def test_a_broken_stream_resumes_with_a_continuation(script):
    c, d0, p0 = _decode_pool(**script)
    asked = []

    def respawn(dead, body):
        asked.append((dead.replica_id, body))
        return Leg(c.pools["prefill"], "p0", "completions", body)

    async def main():
        return await _relay(c, Leg(c.pools["decode"], "d0", "chat", STREAM), respawn)

    relay, text, resumes = run(main())
    ids, events = stream_tokens(text)
    assert len(ids) == 6 and ids[:2] == stub_token_ids(2) and events[-1] == {"done": True}
    dead, body = asked[0]
    assert dead == "d0" and body["prompt"][-2:] == stub_token_ids(2) and body["max_tokens"] == 4
    assert resumes == ["resumed"] and relay.resumes == 1 and relay.leg.replica_id == "p0"
    # the continuation's chunks are rewritten into the chat stream's format and id
    chunk_ids = {e.get("id") for e in events if "id" in e}
    assert len(chunk_ids) == 1 and all(e.get("object") == "chat.completion.chunk" for e in events if "id" in e)


def test_without_a_spare_engine_the_stream_ends_with_an_error_event():
    c, d0, _ = _decode_pool(break_after=2)

    async def main():
        return await _relay(c, Leg(c.pools["decode"], "d0", "chat", STREAM), respawn=lambda dead, body: None)

    relay, text, resumes = run(main())
    ids, events = stream_tokens(text)
    assert ids == stub_token_ids(2) and events[-2]["error"]["code"] == 503 and events[-1] == {"done": True}
    assert resumes == ["exhausted"] and relay.status == "503" and relay.completed


def test_resumes_stop_at_the_limit():
    c, d0, _ = _decode_pool(break_after=2)
    asked = []

    def respawn(dead, body):
        asked.append(body)
        return None

    async def main():
        return await _relay(c, Leg(c.pools["decode"], "d0", "chat", STREAM), respawn, max_resumes=0)

    relay, text, resumes = run(main())
    assert asked == [] and resumes == ["exhausted"]


def test_closing_the_relay_mid_stream_leaves_it_incomplete():
    c, d0, _ = _decode_pool(hang_after=2)

    async def main():
        leg = Leg(c.pools["decode"], "d0", "chat", STREAM)
        relay = StreamRelay("chat", leg, STREAM, served_name="tiny", max_resumes=2, t0=0.0,
                            respawn=lambda dead, body: None)
        first = await leg.next_item()
        chunks = relay.run(None if first[0] == "head" else first[1])
        await chunks.__anext__()
        await d0.reached_hang.wait()
        await chunks.aclose()
        return relay, c.pools["decode"].replicas["d0"].inflight

    relay, inflight = run(main())
    assert not relay.completed and inflight == 0


def test_decode_does_not_import_the_router():
    import ast
    import pathlib

    import pdserve.decode.leg as mod

    for path in pathlib.Path(mod.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("pdserve.router", "pdserve.cluster")), path
