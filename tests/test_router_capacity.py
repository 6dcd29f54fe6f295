"""The router-capacity benchmark's STUB engine (bench/stub_engine.py) and its analysis, without Ray.

The stub's chunks must be what vLLM's OpenAI server writes (they parse as vLLM's own
response models) and carry what the router reads: decode/resume.py StreamTracker must end
``done`` with exactly the stub's token ids, and router/app.py must count one token per chunk.
"""
from __future__ import annotations

import asyncio
import json
import sys

import pytest

from pdserve.bench.capacity_analysis import analyze_closed_loop, analyze_open_loop, limiting_resource
from pdserve.bench.router_capacity import stub_cluster_config
from pdserve.bench.stub_engine import (STUB_KV_PULL, STUB_NAME, InstantStubEngine, StubSettings, stream_chunks,
                                       stub_messages, stub_token_ids)
from pdserve.decode.relay import carries_token as _carries_token
from pdserve.decode.resume import StreamTracker

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello there, how are you today?"}],
        "max_tokens": 7, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}, "return_token_ids": True}


def _sse(messages) -> list[str]:
    return [it[1] for batch in messages for it in batch if it[0] == "sse"]


def _events(chunks) -> list[str]:
    return [line[6:] for c in chunks for line in c.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("per_message", [1, 3])
def test_stub_stream_feeds_the_router_stream_tracker_to_done(per_message):
    settings = StubSettings(tokens_per_message=per_message)
    head, *messages = list(stub_messages("chat", CHAT, role="monolithic", request_id="chatcmpl-stub-1", created=5,
                                         settings=settings))
    assert head == [("head", {})]  # the stream accepted, before the engine's first output
    tracker = StreamTracker("chat")
    tokens = 0
    for batch in messages:  # as router/app.py _stream does: one text per message
        chunks = [it[1] for it in batch if it[0] == "sse"]
        assert len(chunks) == len(batch)  # no meta (the deployment adds it), no kv outside P/D
        tokens += sum(1 for c in chunks if _carries_token(c))
        tracker.observe("".join(chunks))
    assert tracker.done and tracker.finished
    assert tracker.sent_ids == stub_token_ids(7)
    assert tracker.prompt_ids and tracker.head == {"id": "chatcmpl-stub-1", "created": 5, "model": "tiny"}
    assert tokens == 7
    # role chunk with the first token(s); usage and [DONE] with the last; per_message tokens a message
    assert len(messages) == -(-7 // per_message)
    assert '"role":"assistant"' in messages[0][0][1]
    assert messages[-1][-1] == ("sse", "data: [DONE]\n\n")
    assert '"usage"' in messages[-1][-2][1]


def test_stub_chat_chunks_parse_as_vllm_chat_stream_chunks():
    protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    events = _events(stream_chunks("chat", CHAT, request_id="chatcmpl-stub-2", created=9))
    assert events[-1] == "[DONE]"
    parsed = [protocol.ChatCompletionStreamResponse.model_validate_json(e) for e in events[:-1]]
    assert parsed[0].choices[0].delta.role == "assistant" and parsed[0].prompt_token_ids
    content = parsed[1:-1]
    assert [c.choices[0].token_ids for c in content] == [[t] for t in stub_token_ids(7)]
    assert all(c.object == "chat.completion.chunk" and c.model == "tiny" for c in parsed)
    assert [c.choices[0].finish_reason for c in content] == [None] * 6 + ["length"]
    assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == 7
    # byte for byte what vLLM writes: model_dump_json(exclude_unset=True) of the same objects
    for raw, obj in zip(events[:-1], parsed):
        assert raw == obj.model_dump_json(exclude_unset=True)


def test_without_return_token_ids_or_usage_the_chunks_say_so():
    body = {k: v for k, v in CHAT.items() if k not in ("return_token_ids", "stream_options")}
    events = [json.loads(e) for e in _events(stream_chunks("chat", body, request_id="c", created=1))[:-1]]
    assert events[0]["prompt_token_ids"] is None
    assert all(e["choices"][0]["token_ids"] is None for e in events[1:])
    assert len(events) == 8 and events[-1]["choices"][0]["finish_reason"] == "length"


def test_stub_completion_chunks_parse_as_vllm_completion_chunks():
    protocol = pytest.importorskip("vllm.entrypoints.openai.completion.protocol")
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 4, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    events = _events(stream_chunks("completions", body, request_id="cmpl-stub-3", created=1))
    parsed = [protocol.CompletionStreamResponse.model_validate_json(e) for e in events[:-1]]
    assert [p.choices[0].token_ids for p in parsed[:-1]] == [[t] for t in stub_token_ids(4)]
    assert parsed[0].choices[0].prompt_token_ids and parsed[-1].usage.completion_tokens == 4


def test_prefill_leg_answers_json_with_kv_transfer_params():
    protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    from pdserve.kv_transfer.registry import prefill_request_params

    # what router/app.py _pd_legs sends to the prefill pool
    body = {k: v for k, v in CHAT.items() if k != "stream_options"}
    body.update(max_tokens=1, stream=False, kv_transfer_params=prefill_request_params())
    messages = list(stub_messages("chat", body, role="prefill", request_id="chatcmpl-stub-4"))
    assert len(messages) == 1 and len(messages[0]) == 1
    kind, answer = messages[0][0]
    assert kind == "json" and answer["kv_transfer_params"] == {"stub": True}
    assert protocol.ChatCompletionResponse.model_validate(answer).usage.completion_tokens == 1


def test_decode_leg_reports_its_kv_pull_before_the_first_token():
    body = dict(CHAT, kv_transfer_params={"stub": True, "transfer_deadline_s": 0.5})
    first = next(stub_messages("chat", body, role="decode", request_id="chatcmpl-stub-5"))
    assert first[0] == ("kv", STUB_KV_PULL) and first[1][0] == "sse"
    # a fallback decode leg (no params) has no pull to report: its stream starts with its head
    assert next(stub_messages("chat", CHAT, role="decode", request_id="x")) == [("head", {})]


def test_unknown_endpoint_is_an_engine_error_item():
    [[item]] = list(stub_messages("embeddings", CHAT, role="monolithic", request_id="x"))
    assert item[0] == "error" and item[1] == 404


def test_the_deployment_class_streams_meta_first_and_reports_a_healthy_load():
    eng = InstantStubEngine("monolithic", StubSettings(tokens_per_message=2).to_dict(), replica_id="r1")
    assert InstantStubEngine.__name__ == STUB_NAME and eng.stub

    async def run():
        out = []
        async for batch in eng.generate("chat", CHAT, replica="r1"):
            out.append(batch)
            assert eng.load()["running"] == 1
        return out

    batches = asyncio.run(run())
    assert batches[0][0] == ("meta", {"replica": "r1", "role": "monolithic", "stub": STUB_NAME})
    tracker = StreamTracker("chat")
    for b in batches:
        tracker.observe("".join(it[1] for it in b if it[0] == "sse"))
    assert tracker.done and tracker.sent_ids == stub_token_ids(7)
    load = eng.load()
    assert load["replica"] == "r1" and load["running"] == 0 and load["waiting"] == 0
    assert load["kv_cache_usage"] == 0.0 and load["kv_capacity_tokens"] > 0
    asyncio.run(eng.check_health())


@pytest.mark.parametrize("mode", ["monolithic", "pd"])
def test_the_stub_cluster_config_validates(mode):
    cfg = stub_cluster_config(mode, port=8471, stub_replicas=2)
    assert cfg.model.path == "builtin:tiny" and cfg.device == "cpu"
    assert set(cfg.pools()) == ({"monolithic"} if mode == "monolithic" else {"prefill", "decode"})
    assert all(len(p.cpu_cores) == 2 for p in cfg.pools().values())
    assert cfg.admission.max_inflight >= 1000


def test_importing_the_benchmark_starts_nothing():
    import ray

    assert not ray.is_initialized()
    assert "pdserve.bench.router_capacity" in sys.modules


def _lv(label, rps, ttft99, err=0.0, streams=None, **cpu):
    return {"label": label, "rps": rps, "tokens_per_s": rps * 64, "ttft_p99_ms": ttft99, "error_rate": err,
            "completed": int(rps * 10), "streams_mean": streams or float(label.split("=")[1]), "cpu": cpu or None}


def test_saturation_is_where_req_per_s_stops_growing():
    levels = [_lv("c=1", 100, 2.0), _lv("c=8", 600, 4.0), _lv("c=32", 900, 8.0), _lv("c=64", 950, 15.0),
              _lv("c=128", 960, 30.0)]
    a = analyze_closed_loop(levels)
    assert a["saturated"] and a["knee_level"] == "c=32" and "grew only" in a["reason"]
    # c=128's p99 TTFT (30 ms) is over 10x the low-load 2 ms: not sustained
    assert a["capacity_rps"] == 950 and a["capacity_level"] == "c=64" and a["max_streams_within_bounds"] == 64
    assert a["judged_level"] == "c=64"


def test_saturation_by_latency_and_no_saturation():
    a = analyze_closed_loop([_lv("c=1", 100, 2.0), _lv("c=8", 700, 25.0)])
    assert a["saturated"] and a["knee_level"] == "c=1" and "TTFT" in a["reason"]
    b = analyze_closed_loop([_lv("c=1", 100, 2.0), _lv("c=8", 700, 5.0)])
    assert b["saturated"] is False and b["capacity_rps"] == 700
    o = analyze_open_loop([dict(_lv("c=1", 99, 3.0), offered_rps=100), dict(_lv("c=2", 150, 3.0), offered_rps=200)],
                          ttft_limit_ms=20.0)
    assert o["sustained_rate_rps"] == 100


def test_limiting_resource_names_the_router_the_machine_or_the_client():
    assert limiting_resource(_lv("c=1", 1, 1, router_pct=97.0, machine_busy_pct=70.0, ncores=2,
                                 client_max_pct=30.0))["resource"] == "router replica CPU"
    assert limiting_resource(_lv("c=1", 1, 1, router_pct=60.0, machine_busy_pct=98.0, machine_busy_cores=1.96,
                                 ncores=2, client_max_pct=30.0, stubs_total_pct=50.0, clients_pct=30.0,
                                 other_busy_cores=0.06))["resource"] == "machine CPU"
    assert limiting_resource(_lv("c=1", 1, 1, router_pct=50.0, machine_busy_pct=60.0, ncores=2,
                                 client_max_pct=95.0))["resource"] == "load client"
