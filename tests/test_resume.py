"""Mid-stream resume bookkeeping (decode/resume.py) on hand-written SSE events."""
from __future__ import annotations

import json

from pdserve.decode.resume import StreamTracker, error_event


def _event(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def test_tracker_builds_the_exact_continuation_and_rewrites_it_as_chat():
    t = StreamTracker("chat")
    t.observe(_event({"id": "chatcmpl-1", "created": 7, "model": "tiny", "prompt_token_ids": [5, 6, 7],
                      "choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
    t.observe(_event({"id": "chatcmpl-1", "choices": [{"delta": {"content": "a"}, "token_ids": [11]}]})
              + _event({"id": "chatcmpl-1", "choices": [{"delta": {"content": "b"}, "token_ids": [12]}]}))
    body = {"messages": [], "max_tokens": 10, "temperature": 0, "seed": 3, "stream_options": {}, "n": 1,
            "return_token_ids": True}
    assert t.can_resume(body)
    cont = t.continuation(body, "tiny")
    assert cont == {"temperature": 0, "seed": 3, "max_tokens": 8, "model": "tiny", "prompt": [5, 6, 7, 11, 12],
                    "stream": True, "return_token_ids": True}

    out = t.rewrite(_event({"id": "cmpl-x", "choices": [{"text": "", "token_ids": []}]})
                    + _event({"id": "cmpl-x", "choices": [{"text": "c", "token_ids": [13], "finish_reason": "length"}]})
                    + "data: [DONE]\n\n")
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) == 2  # the empty continuation chunk is dropped
    chunk = json.loads(events[0])
    assert chunk["id"] == "chatcmpl-1" and chunk["object"] == "chat.completion.chunk" and chunk["model"] == "tiny"
    assert chunk["choices"][0]["delta"] == {"content": "c"} and chunk["choices"][0]["token_ids"] == [13]
    t.observe(out)
    assert t.sent_ids == [11, 12, 13] and t.finished and t.done


def test_no_resume_without_prompt_ids_after_the_finish_or_for_n_above_one():
    t = StreamTracker("completions")
    t.observe(_event({"id": "c", "choices": [{"text": "a", "token_ids": [1]}]}))
    ids = {"return_token_ids": True}  # what the router asks a stream it may resume for
    assert not t.can_resume(ids)  # the first chunk carried no prompt ids
    t.observe(_event({"id": "c", "prompt_token_ids": [9], "choices": []}))
    assert t.can_resume(ids) and not t.can_resume(dict(ids, n=2))
    assert not t.can_resume({})  # token ids not asked for (an echo stream): its sent ids are unknown
    t.observe(_event({"id": "c", "choices": [{"text": "b", "token_ids": [2], "finish_reason": "stop"}]}))
    assert not t.can_resume(ids)


def test_error_event_is_openai_shaped_and_ends_the_stream():
    lines = [line for line in error_event("boom").splitlines() if line]
    assert json.loads(lines[0][6:])["error"] == {"message": "boom", "type": "ServiceUnavailableError",
                                                  "param": None, "code": 503}
    assert lines[1] == "data: [DONE]"


def test_completions_streams_carry_prompt_ids_per_choice():
    t = StreamTracker("completions")
    first = {"id": "cmpl-1", "created": 1, "model": "tiny", "object": "text_completion",
             "choices": [{"index": 0, "text": "a", "prompt_token_ids": [5, 6, 7], "token_ids": [11],
                          "finish_reason": None}]}
    t.observe(f"data: {json.dumps(first)}\n\n")
    assert t.can_resume({"prompt": "x", "return_token_ids": True})
    body = t.continuation({"prompt": "x", "max_tokens": 4, "temperature": 0}, "tiny")
    assert body["prompt"] == [5, 6, 7, 11] and body["max_tokens"] == 3


def _full_parse_ids(events: list[str]) -> list[int]:
    ids = []
    for e in events:
        data = e[len("data: "):].strip()
        if data == "[DONE]":
            continue
        for c in json.loads(data).get("choices") or []:
            ids.extend(c.get("token_ids") or [])
    return ids


def test_the_fast_token_chunk_path_reads_what_a_full_parse_reads():
    head = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny",'
    events = [
        "data: " + head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        '"finish_reason":null}],"prompt_token_ids":[1,2,3]}\n\n',
        "data: " + head + '"choices":[{"index":0,"delta":{"content":" a"},"logprobs":null,"finish_reason":null,'
        '"token_ids":[343]}]}\n\n',
        # content that spells the key, escaped as JSON must: the fast path must not be fooled
        "data: " + head + '"choices":[{"index":0,"delta":{"content":"\\"token_ids\\":[9] ]"},"logprobs":null,'
        '"finish_reason":null,"token_ids":[7,8]}]}\n\n',
        # a chunk without ids, two choices, then the finish
        "data: " + head + '"choices":[{"index":0,"delta":{"content":""},"logprobs":null,"finish_reason":null,'
        '"token_ids":[]}]}\n\n',
        "data: " + head + '"choices":[{"index":0,"delta":{"content":"x"},"token_ids":[11]},'
        '{"index":1,"delta":{"content":"y"},"token_ids":[12]}]}\n\n',
        "data: " + head + '"choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":"length",'
        '"stop_reason":null,"token_ids":[99]}]}\n\n',
        "data: [DONE]\n\n",
    ]
    t = StreamTracker("chat")
    for e in events:
        t.observe(e)
    assert t.sent_ids == _full_parse_ids(events) == [343, 7, 8, 11, 12, 99]
    assert t.prompt_ids == [1, 2, 3] and t.finished and t.done
    assert t.head == {"id": "chatcmpl-1", "created": 1, "model": "tiny"}


def test_the_fast_path_agrees_with_a_full_parse_on_stub_streams():
    from pdserve.bench.stub_engine import stream_chunks, stub_token_ids

    for endpoint in ("chat", "completions"):
        body = {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "max_tokens": 9, "stream": True,
                "return_token_ids": True, "stream_options": {"include_usage": True}}
        events = list(stream_chunks(endpoint, body, request_id="r", created=1))
        t = StreamTracker(endpoint)
        for e in events:
            t.observe(e)
        assert t.sent_ids == _full_parse_ids(events) == stub_token_ids(9)
        assert t.finished and t.done and t.prompt_ids


def _tracker_after(endpoint: str, prompt: list[int], sent: list[int]) -> StreamTracker:
    t = StreamTracker(endpoint)
    t.observe(_event({"id": "x", "created": 1, "model": "tiny", "prompt_token_ids": prompt, "choices": []}))
    for tok in sent:
        t.observe(_event({"id": "x", "choices": [{"delta": {"content": "t"}, "token_ids": [tok]}]}))
    return t


def test_a_continuation_without_a_limit_ends_where_vllm_would_have():
    # chat without max_tokens: vLLM generates to the end of the context, not the 16 a
    # completions call (the continuation) would default to
    t = _tracker_after("chat", [1, 2, 3], [4, 5])
    assert t.continuation({"messages": []}, "tiny", max_model_len=100)["max_tokens"] == 95
    # completions without max_tokens: vLLM's default of 16, less what was already sent
    t = _tracker_after("completions", [1, 2, 3], [4, 5])
    assert t.continuation({"prompt": "x"}, "tiny", max_model_len=100)["max_tokens"] == 14


def test_a_continuation_owes_only_the_rest_of_min_tokens():
    t = _tracker_after("chat", [1, 2, 3], [4, 5, 6])
    cont = t.continuation({"messages": [], "max_tokens": 10, "min_tokens": 5}, "tiny")
    assert cont["max_tokens"] == 7 and cont["min_tokens"] == 2
    cont = t.continuation({"messages": [], "max_tokens": 10, "min_tokens": 2}, "tiny")
    assert cont["min_tokens"] == 0


def _resumed_tracker(endpoint: str, sent: int = 2) -> StreamTracker:
    """A tracker whose stream (prompt 5, 6, 7) was cut after ``sent`` tokens, then resumed."""
    t = StreamTracker(endpoint)
    first = ({"id": "chatcmpl-1", "created": 7, "model": "tiny", "prompt_token_ids": [5, 6, 7],
              "choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
             if endpoint == "chat" else
             {"id": "cmpl-1", "created": 7, "model": "tiny",
              "choices": [{"index": 0, "text": "a", "prompt_token_ids": [5, 6, 7], "token_ids": [11]}]})
    t.observe(_event(first))
    while len(t.sent_ids) < sent:
        t.observe(_event({"id": first["id"], "choices": [{"index": 0, "text": "b", "delta": {"content": "b"},
                                                          "token_ids": [12]}]}))
    t.continuation({"max_tokens": 10, "temperature": 0, "return_token_ids": True}, "tiny")
    return t


def _rewritten(t: StreamTracker, *chunks) -> list[dict]:
    out = t.rewrite("".join(_event(c) for c in chunks))
    return [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: ")]


def test_a_continuation_carries_every_option_that_shapes_its_tokens_and_usage():
    """logit_bias, allowed_token_ids, bad_words and include_stop_str_in_output were dropped, so
    a resumed stream went on with other tokens or without its stop string; a client that asked
    for usage got none after a resume."""
    t = _resumed_tracker("chat")
    body = {"max_tokens": 10, "temperature": 0, "logit_bias": {"5": 3.0}, "allowed_token_ids": [5, 9],
            "bad_words": ["x"], "stop": ["or"], "include_stop_str_in_output": True, "return_token_ids": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    cont = t.continuation(body, "tiny")
    for key in ("logit_bias", "allowed_token_ids", "bad_words", "stop", "include_stop_str_in_output"):
        assert cont[key] == body[key], key
    assert cont["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert "stream_options" not in t.continuation(dict(body, stream_options=None), "tiny")


def test_rewritten_chat_chunks_are_laid_out_as_vllms():
    t = _resumed_tracker("chat")
    mid, last = _rewritten(t, {"id": "cmpl-x", "choices": [{"index": 0, "text": "c", "logprobs": None,
                                                             "finish_reason": None, "stop_reason": None,
                                                             "prompt_token_ids": [5, 6, 7, 11, 12],
                                                             "token_ids": [13]}]},
                           {"id": "cmpl-x", "choices": [{"index": 0, "text": "d", "logprobs": None,
                                                         "finish_reason": "stop", "stop_reason": "or",
                                                         "prompt_token_ids": None, "token_ids": [14]}],
                            "system_fingerprint": "fp"})
    assert mid["choices"] == [{"index": 0, "delta": {"content": "c"}, "logprobs": None, "finish_reason": None,
                               "token_ids": [13]}]
    assert last["choices"] == [{"index": 0, "delta": {"content": "d"}, "logprobs": None, "finish_reason": "stop",
                                "stop_reason": "or", "token_ids": [14]}]
    assert last["system_fingerprint"] == "fp" and "system_fingerprint" not in mid
    assert (last["id"], last["created"], last["object"]) == ("chatcmpl-1", 7, "chat.completion.chunk")


def test_rewritten_completions_chunks_keep_vllms_layout_without_the_continuations_prompt():
    t = _resumed_tracker("completions")
    (chunk,) = _rewritten(t, {"id": "cmpl-x", "choices": [{"index": 0, "text": "c", "logprobs": None,
                                                            "finish_reason": "length", "stop_reason": None,
                                                            "prompt_token_ids": [5, 6, 7, 11, 12],
                                                            "token_ids": [13]}]})
    assert chunk["choices"] == [{"index": 0, "text": "c", "logprobs": None, "finish_reason": "length",
                                 "stop_reason": None, "prompt_token_ids": None, "token_ids": [13]}]
    assert chunk["id"] == "cmpl-1" and t.prompt_ids == [5, 6, 7]


def test_usage_after_a_resume_counts_the_original_prompt_and_every_token_sent():
    t = _resumed_tracker("chat", sent=2)
    running, final = _rewritten(
        t, {"id": "cmpl-x", "choices": [{"index": 0, "text": "c", "finish_reason": None, "token_ids": [13]}],
            "usage": {"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1}},
        {"id": "cmpl-x", "choices": [], "system_fingerprint": "fp",
         "usage": {"prompt_tokens": 5, "total_tokens": 6, "completion_tokens": 1,
                   "prompt_tokens_details": {"cached_tokens": 4}}})
    assert running["usage"] == {"prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3,
                                "completion_tokens_details": None}
    assert final["choices"] == [] and final["usage"] == {
        "prompt_tokens": 3, "total_tokens": 6, "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 3, "created_cache_tokens": 0}}
    t = _resumed_tracker("completions", sent=2)
    (final,) = _rewritten(t, {"id": "cmpl-x", "choices": [],
                              "usage": {"prompt_tokens": 5, "total_tokens": 7, "completion_tokens": 2,
                                        "prompt_tokens_details": {"cached_tokens": 0}}})
    assert final["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4,
                              "prompt_tokens_details": {"cached_tokens": 0}}


def test_text_vllm_held_back_for_a_stop_string_goes_out_ahead_of_the_continuation():
    """vLLM sends ' tenan' for the token ' tenant' while 't' may start a stop string; a stream cut
    there lost the 't' (the continuation starts after the token)."""
    t = StreamTracker("chat", track_text=True)
    t.observe(_event({"id": "chatcmpl-1", "created": 7, "model": "tiny", "prompt_token_ids": [5, 6],
                      "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
    # compact, as vLLM writes it: read by the fast path, without a JSON parse (an escaped quote in it)
    t.observe('data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"tiny","choices":'
              '[{"index":0,"delta":{"content":" \\"tenan"},"logprobs":null,"finish_reason":null,"token_ids":[555]}]}'
              '\n\n')
    assert t.sent_ids == [555] and t.sent_text == ["", ' "tenan']
    t.continuation({"max_tokens": 10, "temperature": 0, "stop": ["x"], "return_token_ids": True}, "tiny")
    t.recover_held_back(lambda ids: " something else")
    assert t.held_back == ""  # text that does not extend what was sent: nothing is made up
    t.recover_held_back(lambda ids: ' "tenant\ufffd')
    assert t.held_back == "t"  # an incomplete character comes with the next token
    (chunk,) = _rewritten(t, {"id": "cmpl-x", "choices": [{"index": 0, "text": "or", "finish_reason": None,
                                                            "token_ids": [279]}]})
    assert chunk["choices"][0]["delta"] == {"content": "tor"} and t.held_back == ""
