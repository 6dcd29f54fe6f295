"""The fidelity test's comparison (bench/fidelity_compare.py): it masks only what must differ
between two servers, and finds every other difference."""
from __future__ import annotations

import copy
import json

import pytest

from pdserve.bench.fidelity_compare import Answer, canonical, differences, parse_sse
from pdserve.bench.fidelity_shapes import BOUNDED_ANSWERS, SHAPES, bounded, by_name

JSON = {"content-type": "application/json"}
SSE = {"content-type": "text/event-stream; charset=utf-8"}


def _whole(**over):
    body = {"id": "chatcmpl-aaa", "object": "chat.completion", "created": 1, "model": "tiny",
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi there", "tool_calls": [
                {"id": "chatcmpl-tool-1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                "logprobs": None, "finish_reason": "length", "stop_reason": None, "token_ids": None}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                      "prompt_tokens_details": {"cached_tokens": 0, "created_cache_tokens": 0}}}
    body.update(over)
    return body


def _chunk(content=None, finish=None, role=None, idx=0, cid="chatcmpl-x", created=1, **extra):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": "tiny",
            "choices": [{"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish,
                         "stop_reason": None, "token_ids": None}], **extra}


def _sse(*chunks) -> str:
    return "".join(f"data: {json.dumps(c) if c != '[DONE]' else c}\n\n" for c in chunks)


def _same(a: Answer, b: Answer) -> list[str]:
    return differences(canonical(a), canonical(b))


def test_ids_timestamps_fingerprints_and_cache_counts_are_masked():
    other = _whole(id="chatcmpl-bbb", created=99, system_fingerprint="fp")
    other["choices"][0]["message"]["tool_calls"][0]["id"] = "chatcmpl-tool-2"
    other["usage"]["prompt_tokens_details"] = {"cached_tokens": 32, "created_cache_tokens": 5}
    assert _same(Answer(200, JSON, _whole()), Answer(200, JSON, other)) == []


def test_every_other_field_is_compared():
    base = Answer(200, JSON, _whole())
    for path, value in [(("choices", 0, "message", "content"), "hi thera"),
                        (("choices", 0, "finish_reason"), "stop"),
                        (("usage", "prompt_tokens"), 6),
                        (("choices", 0, "token_ids"), [1, 2]),
                        (("model",), "other")]:
        body = copy.deepcopy(base.body)
        node = body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert _same(base, Answer(200, JSON, body)), path
    extra = copy.deepcopy(base.body)
    extra["kv_transfer_params"] = {"remote": 1}
    assert any("only in pdserve" in line for line in _same(base, Answer(200, JSON, extra)))
    cached = copy.deepcopy(base.body)
    del cached["usage"]["prompt_tokens_details"]
    assert _same(base, Answer(200, JSON, cached))  # masked values, compared presence
    assert _same(base, Answer(201, JSON, base.body))


def test_a_logprob_differs_in_its_last_bit():
    a, b = _whole(), _whole()
    a["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": -1.25, "bytes": [120], "top_logprobs": []}]}
    b["choices"][0]["logprobs"] = {"content": [{"token": "x", "logprob": -1.2500000000000002, "bytes": [120],
                                                "top_logprobs": []}]}
    assert _same(Answer(200, JSON, a), Answer(200, JSON, b))


def test_errors_compare_status_type_param_and_message():
    err = {"error": {"message": "n must be at least 1, got 0.", "type": "BadRequestError", "param": None, "code": 400}}
    other = copy.deepcopy(err)
    other["error"]["param"] = "n"
    assert _same(Answer(400, JSON, err), Answer(400, JSON, copy.deepcopy(err))) == []
    assert _same(Answer(400, JSON, err), Answer(400, JSON, other))


def test_a_stream_cut_into_other_chunks_is_the_same_stream():
    one = parse_sse(_sse(_chunk("", role="assistant"), _chunk("a"), _chunk("b"), _chunk("c", finish="length"),
                         "[DONE]"))
    merged = parse_sse(_sse(_chunk("", role="assistant", cid="chatcmpl-y", created=5), _chunk("ab", cid="chatcmpl-y",
                                                                                          created=5),
                            _chunk("c", finish="length", cid="chatcmpl-y", created=5), "[DONE]"))
    assert _same(Answer(200, SSE, events=one), Answer(200, SSE, events=merged)) == []


def test_stream_differences_are_found():
    base = [_chunk("", role="assistant"), _chunk("a"), _chunk("b", finish="length"), "[DONE]"]
    cases = {
        "text": [_chunk("", role="assistant"), _chunk("a"), _chunk("c", finish="length"), "[DONE]"],
        "finish": [_chunk("", role="assistant"), _chunk("a"), _chunk("b", finish="stop"), "[DONE]"],
        "no done": [_chunk("", role="assistant"), _chunk("a"), _chunk("b", finish="length")],
        "an empty chunk": [_chunk("", role="assistant"), _chunk("a"), _chunk(""), _chunk("b", finish="length"),
                           "[DONE]"],
        "a key missing": [_chunk("", role="assistant"), _chunk("a"),
                          {**_chunk("b", finish="length"), "choices": [{"index": 0, "delta": {"content": "b"},
                                                                        "logprobs": None, "finish_reason": "length",
                                                                        "token_ids": None}]}, "[DONE]"],
        "two ids": [_chunk("", role="assistant"), _chunk("a", cid="chatcmpl-z"), _chunk("b", finish="length"),
                    "[DONE]"],
        "usage": [_chunk("", role="assistant"), _chunk("a"), _chunk("b", finish="length"),
                  {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                   "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
                  "[DONE]"],
    }
    for name, events in cases.items():
        assert _same(Answer(200, SSE, events=base), Answer(200, SSE, events=events)), name


def test_sse_parsing_keeps_errors_and_raw_lines():
    text = 'data: {"error": {"message": "m", "type": "T", "param": null, "code": 400}}\n\ndata: [DONE]\n\n'
    assert parse_sse(text) == [{"error": {"message": "m", "type": "T", "param": None, "code": 400}}, "[DONE]"]
    assert parse_sse("data: not json\n\n") == [{"raw": "data: not json"}]


@pytest.mark.parametrize("shapes", [SHAPES, bounded()], ids=["whole", "bounded"])
def test_the_shape_sets_cover_every_option(shapes):
    assert len(by_name()) >= 60 and BOUNDED_ANSWERS <= set(by_name())
    for endpoint in ("chat", "completions"):
        kinds = {(s.stream, s.bad) for s in shapes if s.endpoint == endpoint}
        assert {(False, False), (True, False), (False, True)} <= kinds, endpoint
    keys = {k for s in shapes for k in s.body}
    for option in ("min_tokens", "n", "logprobs", "top_logprobs", "prompt_logprobs", "seed", "top_p", "top_k", "stop",
                   "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "max_completion_tokens",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "response_format",
                   "tools", "tool_choice", "chat_template_kwargs", "add_generation_prompt", "continue_final_message",
                   "echo", "stream_options", "user", "return_token_ids"):
        assert option in keys, option
    assert any(s.resume for s in shapes if s.endpoint == "chat") and any(s.resume for s in shapes
                                                                           if s.endpoint == "completions")
    for s in shapes:
        if s.resume:
            assert s.stream and s.body.get("temperature") == 0 and not s.whole, s.name
        # every shape the resume path leaves out says why
        assert (s.resume_exclusion() is None) == s.resume, s.name


def test_on_the_fallback_path_only_a_pd_answer_that_pulled_no_kv_may_stay_pd():
    from pdserve.bench.fidelity import compare, pd_without_transfer

    shape = by_name()["comp.prompt_logprobs.json"]
    want = Answer(200, {}, _whole())

    def answer(**headers):
        return Answer(200, {"x-pdserve-path": "pd", "x-pdserve-prefill-ms": "3.1", **headers}, _whole())

    cached = answer()  # the decode engine held the whole prompt: no pull, the link never used
    zero = answer(**{"x-pdserve-kv-transfer": "ok; ms=0.10; bytes=0; mode=inline"})
    pulled = answer(**{"x-pdserve-kv-transfer": "ok; ms=2.00; bytes=40960; mode=inline"})
    streamed = Answer(200, {"x-pdserve-path": "pd"}, _whole())  # a stream says nothing of its pull
    assert pd_without_transfer(cached) and pd_without_transfer(zero)
    assert not pd_without_transfer(pulled) and not pd_without_transfer(streamed)
    assert compare(shape, "fallback-grpc", want, cached, "fallback") is None
    assert "not 'fallback'" in compare(shape, "fallback-grpc", want, pulled, "fallback").lines[-1]
    assert "not 'fallback'" in compare(shape, "fallback-grpc", want, streamed, "fallback").lines[-1]
