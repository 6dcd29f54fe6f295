"""Mid-stream resume bookkeeping (router/resume.py) on hand-written SSE events."""
from __future__ import annotations

import json

from pdserve.router.resume import StreamTracker, error_event


def _event(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def test_tracker_builds_the_exact_continuation_and_rewrites_it_as_chat():
    t = StreamTracker("chat")
    t.observe(_event({"id": "chatcmpl-1", "created": 7, "model": "tiny", "prompt_token_ids": [5, 6, 7],
                      "choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
    t.observe(_event({"id": "chatcmpl-1", "choices": [{"delta": {"content": "a"}, "token_ids": [11]}]})
              + _event({"id": "chatcmpl-1", "choices": [{"delta": {"content": "b"}, "token_ids": [12]}]}))
    body = {"messages": [], "max_tokens": 10, "temperature": 0, "seed": 3, "stream_options": {}, "n": 1}
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
    assert not t.can_resume({})  # the first chunk carried no prompt ids
    t.observe(_event({"id": "c", "prompt_token_ids": [9], "choices": []}))
    assert t.can_resume({}) and not t.can_resume({"n": 2})
    t.observe(_event({"id": "c", "choices": [{"text": "b", "token_ids": [2], "finish_reason": "stop"}]}))
    assert not t.can_resume({})


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
    assert t.can_resume({"prompt": "x"})
    body = t.continuation({"prompt": "x", "max_tokens": 4, "temperature": 0}, "tiny")
    assert body["prompt"] == [5, 6, 7, 11] and body["max_tokens"] == 3
