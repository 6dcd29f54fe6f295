"""The benchmarks' load client (bench/loadgen.py) and the router-capacity bench's use of it
(bench/capacity_load.py), against a scripted SSE server on loopback: no engine, no Ray.

The server is a TEST SERVER, not vLLM: it writes the chunks vLLM writes (bench/stub_engine.py's,
checked against vLLM's own models in tests/test_router_capacity.py) at delays the test sets.
Times are checked only from below (a response cannot come before the server sent it) and
through identities (TTFT plus the ITLs is the E2E latency), never against a speed.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from pdserve.bench import capacity_load
from pdserve.bench.loadgen import (ENDPOINTS, LoadSpec, SSETally, arrival_gaps, arrival_offsets, open_session,
                                   request_body, run_load, send_request)
from pdserve.bench.stats import RequestOutput
from pdserve.bench.stub_engine import stream_chunks
from pdserve.bench.workloads import SampleRequest

FIRST_DELAY_S = 0.05
TOKEN_DELAY_S = 0.02
TOKENS = 4


def _chunks(endpoint: str = "chat", n: int = TOKENS, usage: bool = True) -> list[bytes]:
    """vLLM's SSE chunks of an ``n``-token answer: the role chunk (chat), n token chunks, the
    usage chunk (when asked for) and [DONE]."""
    body = {"model": "tiny", "max_tokens": n, "stream": True}
    body.update({"messages": [{"role": "user", "content": "hi there"}]} if endpoint == "chat" else {"prompt": "hi"})
    if usage:
        body["stream_options"] = {"include_usage": True}
    return [c.encode() for c in stream_chunks(endpoint, body, request_id="cmpl-test", created=1)]


def _spaced(chunk: bytes) -> bytes:
    """The same chunk as json.dumps writes it (spaces after ':' and ','): the markers the client
    counts do not match, so it has to parse the JSON."""
    line = chunk.decode().strip()
    data = line[len("data: "):]
    return (line if data == "[DONE]" else "data: " + json.dumps(json.loads(data))).encode() + b"\n\n"


class ScriptedServer:
    """A TEST SERVER on 127.0.0.1: what each POST answers is named by the request's "model"."""

    def __init__(self) -> None:
        self.port = 0
        self.inflight = 0
        self.max_inflight = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _answer(self, request):
        from aiohttp import web

        body = await request.json()
        script = body["model"]
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if script.startswith("status"):
                return web.json_response({"error": {"message": "no room", "code": 503}}, status=int(script[6:]),
                                         headers={"x-pdserve-path": "pd"})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-pdserve-path": "fallback",
                                               "x-pdserve-fallback-cause": "kv_link_down"})
            await resp.prepare(request)
            endpoint = "chat" if request.path == ENDPOINTS["chat"] else "completions"
            chunks = _chunks(endpoint, usage=script != "no-usage")
            tokens = [b'"choices":[{' in c for c in chunks]
            if script == "spaced":
                chunks = [_spaced(c) for c in chunks]
            if script == "fast":
                await resp.write(b"".join(chunks))
                return resp
            if script == "error-event":
                chunks = chunks[:3] + [b'data: {"error":{"message":"resume exhausted","code":503}}\n\n']
            if script == "cut":
                chunks = [c for c in chunks if b"[DONE]" not in c]
            head = 2 if endpoint == "chat" else 1  # the role chunk comes with the first token, as vLLM sends it
            await asyncio.sleep(FIRST_DELAY_S)
            await resp.write(b"".join(chunks[:head]))
            for c, token in zip(chunks[head:], tokens[head:]):
                if token:
                    await asyncio.sleep(TOKEN_DELAY_S)
                await resp.write(c)
            return resp
        finally:
            self.inflight -= 1

    def _serve(self) -> None:
        from aiohttp import web

        async def main() -> None:
            app = web.Application()
            app.router.add_post(ENDPOINTS["chat"], self._answer)
            app.router.add_post(ENDPOINTS["completions"], self._answer)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def __enter__(self) -> "ScriptedServer":
        self._thread.start()
        assert self._ready.wait(10), "the test server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def server():
    with ScriptedServer() as s:
        yield s


def _send(url: str, script: str, endpoint: str = "chat") -> RequestOutput:
    body = json.dumps(request_body(endpoint, script, SampleRequest("hi there", 2, TOKENS))).encode()

    async def go() -> RequestOutput:
        async with open_session(timeout_s=30) as session:
            return await send_request(session, url + ENDPOINTS[endpoint], body, prompt_len=2, tenant="t1")

    return asyncio.run(go())


# ---------------------------------------------------------------------------------------------
# one request


@pytest.mark.parametrize("script", ["compact", "spaced"])
def test_a_streamed_chat_request_is_timed_and_counted(server, script):
    r = _send(server.url, script)
    assert r.success and r.status == 200 and r.error == ""
    assert (r.path, r.fallback_cause, r.tenant) == ("fallback", "kv_link_down", "t1")
    assert r.output_tokens == TOKENS  # usage.completion_tokens
    assert r.prompt_len > 2  # usage.prompt_tokens (the chat template's), not the target given
    # the role chunk and TOKENS token chunks are token events: one TTFT, then one ITL each
    assert len(r.itl) == TOKENS
    assert r.ttft >= FIRST_DELAY_S
    assert r.latency >= FIRST_DELAY_S + (TOKENS - 1) * TOKEN_DELAY_S
    assert r.ttft + sum(r.itl) == pytest.approx(r.latency)
    assert all(x >= 0 for x in r.itl)
    assert r.tpot == pytest.approx((r.latency - r.ttft) / (TOKENS - 1))


def test_a_completions_stream_and_one_without_usage(server):
    r = _send(server.url, "compact", endpoint="completions")
    assert r.success and r.output_tokens == TOKENS and len(r.itl) == TOKENS - 1
    # no usage chunk: the chunks that carried text count (the chat role chunk's empty content does not)
    r = _send(server.url, "no-usage")
    assert r.success and r.output_tokens == TOKENS and r.prompt_len == 2


@pytest.mark.parametrize("status", [400, 503])
def test_an_error_status_is_a_failed_record_with_its_headers(server, status):
    r = _send(server.url, f"status{status}")
    assert not r.success and r.status == status and r.path == "pd"
    assert r.error.startswith(f"HTTP {status}: ") and "no room" in r.error
    assert r.output_tokens == 0


def test_an_error_event_or_a_cut_stream_fails_the_request(server):
    r = _send(server.url, "error-event")
    assert not r.success and r.status == 200 and r.error == "stream error: resume exhausted"
    r = _send(server.url, "cut")
    assert not r.success and r.status == 200 and r.error == "the stream ended before data: [DONE]"


def test_a_refused_connection_is_a_failed_record_without_status():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = _send(f"http://127.0.0.1:{port}", "compact")
    assert not r.success and r.status == 0 and r.path is None
    assert "ClientConnectorError" in r.error


# ---------------------------------------------------------------------------------------------
# the tally: counting bytes must read what parsing the JSON reads


def _tally(reads: list[bytes], chat: bool = True) -> tuple:
    t = SSETally(chat=chat)
    events = [t.feed(r) for r in reads]
    return events, (t.events, t.texts, t.done, t.completion_tokens, t.prompt_tokens, t.error)


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_counting_bytes_and_parsing_json_tally_alike(endpoint):
    chat = endpoint == "chat"
    chunks = _chunks(endpoint, n=6)
    groupings = [
        [b"".join(chunks)],  # one read
        chunks,  # one read a chunk
        [b"".join(chunks[:3]), b"".join(chunks[3:-2]), b"".join(chunks[-2:])],
    ]
    for reads in groupings:
        counted = _tally(reads, chat)
        parsed = _tally([b"".join(_spaced(c) for c in r.split(b"\n\n") if c) for r in reads], chat)
        assert counted == parsed
        assert counted[1] == (7 if chat else 6, 6, True, 6, counted[1][4], None)


def test_generated_text_that_looks_like_sse_is_not_taken_for_it():
    # a token whose text holds "data: [DONE]" and an escaped '"choices":[{'
    tricky = (b'data: {"choices":[{"index":0,"delta":{"content":"data: [DONE] \\"choices\\":[{"}}]}\n\n')
    plain = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n'
    events, tally = _tally([plain + tricky + plain])
    assert events == [3] and tally[:3] == (3, 3, False)
    events, tally = _tally([b": ping\n\n" + plain, b"data:[DONE]\n\n"])
    assert events == [1, 0] and tally[:3] == (1, 1, True)


# ---------------------------------------------------------------------------------------------
# a list of requests at a load


def _requests(n: int) -> list[SampleRequest]:
    return [SampleRequest(f"request {i}", 2, TOKENS) for i in range(n)]


def test_a_concurrency_cap_bounds_what_is_in_flight(server):
    outputs, duration = asyncio.run(run_load(server.url, "chat", "compact", _requests(9),
                                             LoadSpec(max_concurrency=3)))
    assert [r.success for r in outputs] == [True] * 9 and duration > 0
    assert server.max_inflight <= 3


def test_open_loop_requests_go_out_no_earlier_than_their_arrival_times(server):
    t0 = time.perf_counter()
    outputs, _ = asyncio.run(run_load(server.url, "chat", "fast", _requests(8), LoadSpec(request_rate=40.0),
                                      seed=5, t_origin=t0))
    offsets = arrival_offsets(8, 40.0, 1.0, seed=5)
    assert all(r.success for r in outputs)
    assert all(r.start_time >= at for r, at in zip(outputs, offsets))
    assert offsets[-1] == pytest.approx(8 / 40.0)


# ---------------------------------------------------------------------------------------------
# the router-capacity bench's levels


def _payloads(script: str) -> list[bytes]:
    return [json.dumps(request_body("chat", script, SampleRequest(f"r{i}", 2, TOKENS))).encode() for i in range(4)]


def test_a_closed_loop_level_keeps_records_and_in_flight_samples(server):
    cmd = {"kind": "closed", "t_start": time.perf_counter(), "warmup_s": 0.0, "duration_s": 0.3, "drain_s": 30.0,
           "read_timeout_s": 30.0, "seed": 0, "slot_offset": 0, "max_inflight": 100, "concurrency": 2}
    res = asyncio.run(capacity_load.run_level(cmd, server.url + ENDPOINTS["chat"], _payloads("fast")))
    assert res["unfinished"] == 0 and res["dropped"] == 0
    assert all(isinstance(r, RequestOutput) and r.success and r.output_tokens == TOKENS for r in res["records"])
    assert all(0 <= n <= 2 for n in res["inflight_samples"])


def test_an_open_loop_level_drops_arrivals_past_the_in_flight_cap(server):
    # a cap of 0 drops every arrival; those in the measured window are counted, warm-up ones not
    cmd = {"kind": "open", "t_start": time.perf_counter(), "warmup_s": 0.1, "duration_s": 0.3, "drain_s": 5.0,
           "read_timeout_s": 5.0, "seed": 7, "slot_offset": 0, "max_inflight": 0, "concurrency": 0, "rate": 100.0}
    res = asyncio.run(capacity_load.run_level(cmd, server.url + ENDPOINTS["chat"], _payloads("fast")))
    at, arrivals = 0.0, []
    for gap in arrival_gaps(100.0, 1.0, 7):
        at += gap
        if at >= 0.4:
            break
        arrivals.append(at)
    assert res["records"] == []
    assert res["dropped"] == sum(a >= 0.1 for a in arrivals) > 0


def _rec(start, ttft=0.0, itl=(), latency=0.0, tokens=0, ok=True, status=200, error=""):
    return RequestOutput(success=ok, status=status, ttft=ttft, itl=list(itl), latency=latency, output_tokens=tokens,
                         start_time=start, error=error)


def test_a_level_summary_counts_by_the_window():
    # window [1, 3] s from the level's start
    a = _rec(0.5, ttft=0.1, latency=1.0, tokens=10)  # sent in the warm-up, completed in the window
    b = _rec(1.2, ttft=0.1, itl=[0.2, 0.0, 0.3], latency=0.6, tokens=4)  # sent and completed in it
    c = _rec(2.5, ttft=0.3, itl=[0.4], latency=1.0, tokens=2)  # sent in it, completed after
    d = _rec(2.0, ok=False, status=503, error="HTTP 503: busy")  # sent in it, failed
    e = _rec(3.5, ttft=0.1, latency=0.2, tokens=3)  # after the window
    results = [{"records": [a, b, c], "inflight_samples": [1, 2, 3], "dropped": 1, "unfinished": 0},
               {"records": [d, e], "inflight_samples": [2, 2], "dropped": 0, "unfinished": 1}]
    lv = capacity_load.summarize_level(results, 1.0, 3.0)
    assert (lv["window_s"], lv["completed"], lv["rps"], lv["tokens_per_s"]) == (2.0, 2, 1.0, 7.0)
    assert (lv["issued"], lv["failed"], lv["error_rate"]) == (3, 1, pytest.approx(1 / 3))
    assert (lv["dropped_by_client"], lv["unfinished"]) == (1, 1)
    assert lv["statuses"] == {"200": 4, "503": 1} and lv["error_samples"] == ["HTTP 503: busy"]
    assert (lv["streams_mean"], lv["streams_max"]) == (3.5, 4)  # [1+2, 2+2]
    assert lv["ttft_p50_ms"] == pytest.approx(200.0)  # b and c
    # ITL between reads: the 0 (a token that shared b's read) is left out; 0.2, 0.3, 0.4 s
    assert lv["itl_p50_ms"] == pytest.approx(300.0)
    assert lv["e2e_p50_ms"] == pytest.approx(800.0) and lv["mean_output_tokens"] == 3.0
