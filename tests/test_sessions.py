"""The multi-turn chat workload (bench/workloads.py chat_sessions, bench/sessions.py) against a
scripted chat server on loopback: no engine, no Ray.

The server is a TEST SERVER, not vLLM: it streams vLLM-shaped chunks (compact JSON, a usage
chunk when asked for) whose answer text it makes from the request, and reports as cached every
prompt word but the last message's, so the test can work out the hit rate itself. Times are
checked only from below (a turn cannot go out before the previous answer ended and the think
time passed), never against a speed.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time

import pytest

from pdserve.bench.loadgen import ENDPOINTS, LoadSpec, SSETally
from pdserve.bench.sessions import run_session_benchmark, run_sessions
from pdserve.bench.stats import compute_metrics
from pdserve.bench.stub_engine import stream_chunks
from pdserve.bench.workloads import MultiTurnSpec, chat_sessions
from pdserve.cluster.cli import main as pdserve_main


def _words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


def answer_pieces(messages: list[dict]) -> list[str]:
    """What the server answers: two pieces naming the turn and the last user message."""
    h = hashlib.sha1(messages[-1]["content"].encode()).hexdigest()[:8]
    return [f"turn{len(messages) // 2}", f" {h}"]


class ChatServer:
    """A TEST SERVER: logs each request (body, arrival) and when its answer ended. The model name
    scripts it: ``fail-at-N`` answers 503 to a conversation's turn N (0 first); ``no-details``
    leaves prompt_tokens_details out of the usage."""

    def __init__(self) -> None:
        self.port = 0
        self.log: list[dict] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _chat(self, request):
        from aiohttp import web

        body = await request.json()
        entry = {"body": body, "received": time.perf_counter(), "done": None}
        self.log.append(entry)
        messages, model = body["messages"], body["model"]
        turn = (len(messages) - 2) // 2
        if model.startswith("fail-at-") and turn == int(model[len("fail-at-"):]):
            return web.json_response({"error": {"message": "no room", "code": 503}}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "x-pdserve-path": "pd"})
        await resp.prepare(request)
        head = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1, "model": model}

        async def send(obj) -> None:
            await resp.write(b"data: " + json.dumps(dict(head, **obj), separators=(",", ":")).encode() + b"\n\n")

        pieces = answer_pieces(messages)
        await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for piece in pieces:
            await asyncio.sleep(0.005)
            await send({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        prompt, cached = _words(messages), _words(messages[:-1])
        usage = {"prompt_tokens": prompt, "completion_tokens": len(pieces), "total_tokens": prompt + len(pieces)}
        if model != "no-details":
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({"choices": [], "usage": usage})
        entry["done"] = time.perf_counter()  # just before the end goes out: no client can see it earlier
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def _serve(self) -> None:
        from aiohttp import web

        async def main() -> None:
            app = web.Application()
            app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": "scripted"}]}))
            app.router.add_post(ENDPOINTS["chat"], self._chat)
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

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        assert self._ready.wait(10), "the test server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


SPEC = MultiTurnSpec(num_sessions=3, turns=4, system_prompt_len=40, user_turn_len=6, answer_len=2,
                     think_time_s=0.03, seed=4)


def _run(model: str, spec: MultiTurnSpec = SPEC, rate: float = 40.0):
    sessions = chat_sessions(spec)
    with ChatServer() as server:
        outputs, duration = asyncio.run(run_sessions(server.url, model, sessions, LoadSpec(request_rate=rate)))
    return sessions, server.log, outputs, duration


# ---------------------------------------------------------------------------------------------
# the workload


def test_sessions_share_one_system_prompt_and_are_seeded():
    a, b = chat_sessions(SPEC), chat_sessions(SPEC)
    assert a == b and len(a) == 3
    assert len({s.system_prompt for s in a}) == 1 and len(a[0].system_prompt.split()) == 40
    assert all(len(s.user_turns) == 4 and len(s.think_times_s) == 3 and s.answer_len == 2 for s in a)
    assert all(len(u.split()) == 6 for s in a for u in s.user_turns)
    assert len({s.user_turns for s in a}) == 3  # conversations differ
    other = chat_sessions(MultiTurnSpec(**{**SPEC.__dict__, "seed": 5}))
    assert other[0].system_prompt == a[0].system_prompt  # a new seed keeps the service's system prompt
    assert other[0].user_turns != a[0].user_turns
    assert all(t > 0 for s in a for t in s.think_times_s)
    still = chat_sessions(MultiTurnSpec(num_sessions=1, turns=3, think_time_s=0.0))
    assert still[0].think_times_s == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------
# sessions on the wire


def test_each_turn_waits_for_the_answer_and_resends_the_whole_conversation():
    sessions, log, outputs, _ = _run("scripted")
    assert len(log) == len(outputs) == 12 and all(r.success for r in outputs)
    by_first_turn = {e["body"]["messages"][1]["content"]: [] for e in log}
    for e in log:
        by_first_turn[e["body"]["messages"][1]["content"]].append(e)
    for i, s in enumerate(sessions):
        turns = sorted(by_first_turn[s.user_turns[0]], key=lambda e: len(e["body"]["messages"]))
        assert len(turns) == 4
        answers = []
        for k, e in enumerate(turns):
            body = e["body"]
            msgs = body["messages"]
            assert len(msgs) == 2 * k + 2  # the history grows by one answer and one user turn a turn
            assert msgs[0] == {"role": "system", "content": s.system_prompt}
            assert [m["content"] for m in msgs[1::2]] == list(s.user_turns[:k + 1])
            assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * k + ["user"]
            assert [m["content"] for m in msgs[2::2]] == answers  # the model's own answers, as streamed
            answers.append("".join(answer_pieces(msgs)))
            assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
            assert body["max_tokens"] == 2 and body["ignore_eos"] is True
            if k:
                # sent only after the previous answer ended, and the think time after it
                assert e["received"] >= turns[k - 1]["done"] + s.think_times_s[k - 1]
        mine = [r for r in outputs if r.session == i]
        assert [r.turn for r in mine] == [0, 1, 2, 3]
        assert [r.generated_text for r in mine] == answers


def test_hit_rate_is_cached_over_prompt_tokens():
    sessions, log, outputs, duration = _run("scripted")
    prompt = sum(_words(e["body"]["messages"]) for e in log)
    cached = sum(_words(e["body"]["messages"][:-1]) for e in log)
    served = {(e["body"]["messages"][1]["content"], len(e["body"]["messages"])): e for e in log}
    for r in outputs:  # each record holds what the server said of that very turn
        e = served[(sessions[r.session].user_turns[0], 2 * r.turn + 2)]
        assert (r.prompt_len, r.cached_tokens) == (_words(e["body"]["messages"]), _words(e["body"]["messages"][:-1]))
    m = compute_metrics(outputs, duration)
    assert m["total_input_tokens"] == prompt and m["total_cached_tokens"] == cached
    assert m["prefix_cache_hit_rate"] == pytest.approx(cached / prompt)
    # per turn: the first turn's cache holds only the system prompt; later turns hold more
    first = [e for e in log if len(e["body"]["messages"]) == 2]
    turn0 = sum(_words(e["body"]["messages"][:1]) for e in first) / sum(_words(e["body"]["messages"]) for e in first)
    assert m["per_turn"]["0"]["prefix_cache_hit_rate"] == pytest.approx(turn0)
    rates = [m["per_turn"][str(k)]["prefix_cache_hit_rate"] for k in range(4)]
    assert rates == sorted(rates) and rates[0] < rates[-1]
    assert m["per_turn"]["3"]["mean_prompt_tokens"] > m["per_turn"]["0"]["mean_prompt_tokens"]
    json.dumps(m, allow_nan=False)


def test_no_prompt_tokens_details_is_no_hit_rate_not_zero():
    _, _, outputs, duration = _run("no-details")
    m = compute_metrics(outputs, duration)
    assert all(r.success and r.cached_tokens is None for r in outputs)
    assert m["prefix_cache_hit_rate"] is None and m["total_cached_tokens"] is None


def test_a_failed_turn_ends_its_session():
    sessions = chat_sessions(SPEC)
    with ChatServer() as server:
        res = run_session_benchmark(server.url, "fail-at-2", sessions, LoadSpec(request_rate=40.0),
                                    slos_ms={"ttft": 60000}, progress=False)
        log = server.log
    assert len(log) == 3 * 3  # turns 0, 1 and the failed 2 of each session; never turn 3
    assert res["completed"] == 6 and res["failed"] == 3 and res["status_counts"] == {"200": 6, "503": 3}
    assert res["sessions_completed"] == 0 and res["turns_not_sent"] == 3
    assert res["session_rate"] == 40.0 and res["request_rate"] == 160.0 and res["turns_per_session"] == 4
    assert res["good_requests"] == 6


def test_keeping_text_tallies_as_counting_bytes_does():
    body = {"model": "tiny", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}
    chunks = [c.encode() for c in stream_chunks("chat", body, request_id="x", created=1)]
    counted, kept = SSETally(), SSETally(keep_text=True)
    for c in chunks:
        counted.feed(c)
    kept.feed(b"".join(chunks))
    fields = ("events", "texts", "done", "completion_tokens", "prompt_tokens", "cached_tokens", "error")
    assert [getattr(kept, f) for f in fields] == [getattr(counted, f) for f in fields]
    contents = [json.loads(c[6:])["choices"][0]["delta"].get("content") for c in chunks if b'"choices":[{' in c]
    assert kept.text == "".join(x for x in contents if x) and kept.text
    assert counted.text == ""  # counting bytes keeps no text


# ---------------------------------------------------------------------------------------------
# pdserve bench --workload multi-turn


def test_bench_cli_multi_turn_prints_and_writes_the_hit_rate(tmp_path, capsys):
    out = tmp_path / "r.json"
    with ChatServer() as server:
        rc = pdserve_main(["bench", "--url", server.url, "--workload", "multi-turn", "--rates", "20,40",
                           "--num-sessions", "2", "--turns", "3", "--system-prompt-len", "30", "--user-turn-len", "5",
                           "--answer-len", "2", "--think-time-s", "0.01", "--goodput", "ttft:60000",
                           "--disable-tqdm", "--result-file", str(out)])
        log = server.log
    assert rc == 0
    printed = capsys.readouterr().out
    assert "prefix cache hit rate" in printed and "turn 2:" in printed and "sessions completed 2/2" in printed
    data = json.loads(out.read_text())
    assert data["num_sessions"] == 2 and data["num_prompts"] == 6 and data["workload"].startswith("multi-turn")
    runs = data["runs"]
    assert [r["session_rate"] for r in runs] == [20.0, 40.0] and [r["request_rate"] for r in runs] == [60.0, 120.0]
    assert all(r["completed"] == 6 and 0 < r["prefix_cache_hit_rate"] < 1 for r in runs)
    firsts = [e["body"]["messages"][1]["content"] for e in log if len(e["body"]["messages"]) == 2]
    assert len(set(firsts)) == 4  # each rate's sessions are new conversations
    assert len({e["body"]["messages"][0]["content"] for e in log}) == 1  # over one system prompt


def test_bench_cli_arrival_s_sizes_each_rates_sessions(tmp_path):
    out = tmp_path / "r.json"
    with ChatServer() as server:
        rc = pdserve_main(["bench", "--url", server.url, "--workload", "multi-turn", "--rates", "20,40",
                           "--arrival-s", "0.1", "--turns", "2", "--system-prompt-len", "10", "--user-turn-len", "3",
                           "--answer-len", "2", "--think-time-s", "0", "--disable-tqdm", "--result-file", str(out)])
        log = server.log
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["num_sessions"] for r in data["runs"]] == [2, 4] and len(log) == (2 + 4) * 2
    assert data["arrival_s"] == 0.1 and "arriving for 0.1 s at each rate" in data["workload"]


@pytest.mark.parametrize("argv, message", [
    (["--endpoint", "completions"], "needs --endpoint chat"),
    (["--tenant", "a:k:1"], "sends no --tenant keys"),
])
def test_bench_cli_multi_turn_refuses_what_it_cannot_send(argv, message, capsys):
    assert pdserve_main(["bench", "--url", "http://127.0.0.1:9", "--workload", "multi-turn", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_cli_arrival_s_is_for_multi_turn_only(capsys):
    assert pdserve_main(["bench", "--url", "http://127.0.0.1:9", "--arrival-s", "10"]) == 2
    assert "--arrival-s sizes --workload multi-turn" in capsys.readouterr().err
