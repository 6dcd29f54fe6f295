"""What a client of vLLM's own OpenAI server sends must behave as it did there, however
pdserve serves it (P/D, monolithic, fallback, mid-stream resume). In-memory pools whose
engines refuse what vLLM's serving layer refuses (router_fakes.VllmCheckedEngine)."""
from __future__ import annotations

import json

import pytest
from router_fakes import CHAT, MemoryCluster, VllmCheckedEngine, run, stream_tokens, vllm_rejection

from pdserve.bench.stub_engine import json_response, stream_chunks, stub_text, stub_token_ids
from pdserve.prefill.leg import prefill_body

COMPLETION = {"model": "tiny", "prompt": "hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def vllm_cluster(mode: str = "pd") -> MemoryCluster:
    c = MemoryCluster(mode)
    if mode == "pd":
        c.add("prefill", VllmCheckedEngine("prefill", "p0"))
        c.add("decode", VllmCheckedEngine("decode", "d0"))
    else:
        c.add("monolithic", VllmCheckedEngine("monolithic", "m0"))
    c.build()
    return c


def serve(c: MemoryCluster, body: dict, endpoint: str = "chat"):
    return run(c.serve(body, endpoint=endpoint))


# ---------------------------------------------------------------------------- the prefill leg's cap


# Fields valid for the whole request that a one-token, non-streamed prefill call would refuse.
WHOLE_REQUEST_FIELDS = [
    ("chat", dict(CHAT, min_tokens=5)),
    ("chat", dict(CHAT, max_tokens=None, max_completion_tokens=6, min_tokens=6)),
    ("chat", dict(CHAT, logprobs=True, top_logprobs=2, logprob_token_ids=[5, 7])),
    ("completions", dict(COMPLETION, min_tokens=3)),
    ("completions", dict(COMPLETION, logprobs=1, logprob_token_ids=[5])),
]


@pytest.mark.parametrize("endpoint,body", WHOLE_REQUEST_FIELDS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_fields_valid_for_the_whole_request_pass_the_prefill_leg(endpoint, body, stream):
    body = dict(body, stream=stream)
    assert vllm_rejection(endpoint, body) is None  # vLLM's own server serves it
    assert vllm_rejection(endpoint, prefill_body(body)) is None
    c = vllm_cluster()
    r = serve(c, body, endpoint)
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-path"] == "pd" and "x-pdserve-fallback-cause" not in r.headers
    (_, dbody), = c.engines["d0"].calls
    for key in ("min_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "logprob_token_ids"):
        assert dbody.get(key) == body.get(key)  # the decode leg keeps the client's values


def test_a_field_vllm_refuses_is_still_refused_as_vllm_does():
    body = dict(CHAT, min_tokens=7)  # more than max_tokens=6: vLLM's 400
    c = vllm_cluster()
    r = serve(c, body)
    assert r.status_code == 400 and "min_tokens must be less than or equal to max_tokens=6" in r.text


# ---------------------------------------------------------------------------- several choices (n)


@pytest.mark.parametrize("endpoint,base", [("chat", CHAT), ("completions", COMPLETION)])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_n_above_one_is_served_whole_on_one_engine(endpoint, base, stream):
    body = dict(base, n=2, temperature=0.8, stream=stream)
    c = vllm_cluster()
    r = serve(c, body, endpoint)
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-path"] == "monolithic"
    assert r.headers["x-pdserve-monolithic-cause"] == "several_choices"
    assert r.headers["x-pdserve-decode-replica"] == "d0" and "x-pdserve-prefill-replica" not in r.headers
    assert c.engines["p0"].calls == []  # no prefill leg
    (_, dbody), = c.engines["d0"].calls
    assert dbody["n"] == 2 and "kv_transfer_params" not in dbody
    assert c.router.metrics.requests.labels("monolithic", endpoint, "200")._value.get() == 1


@pytest.mark.parametrize("n,message", [(0, "n must be at least 1, got 0."), (-1, "n must be at least 1, got -1."),
                                       (2, "n must be 1 when using greedy sampling, got 2.")])
def test_n_vllm_refuses_gets_vllms_own_400(n, message):
    c = vllm_cluster()
    r = serve(c, dict(CHAT, n=n))  # CHAT is greedy (temperature 0)
    assert r.status_code == 400 and r.json()["error"]["message"] == message
    assert r.headers["x-pdserve-path"] == "monolithic" and c.engines["p0"].calls == []


def test_n_one_still_takes_the_pd_path():
    c = vllm_cluster()
    r = serve(c, dict(CHAT, n=1))
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
    assert "x-pdserve-monolithic-cause" not in r.headers


def test_n_above_one_falls_to_prefill_when_no_decode_is_healthy():
    c = vllm_cluster()
    c.state("d0").healthy = False
    r = serve(c, dict(CHAT, n=2, temperature=0.8))
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "monolithic"
    assert r.headers["x-pdserve-engine-replica"] == "p0" and c.engines["d0"].calls == []


def test_a_cut_stream_of_several_choices_is_not_resumed():
    c = MemoryCluster("pd")
    c.add("prefill", VllmCheckedEngine("prefill", "p0"))
    c.add("decode", VllmCheckedEngine("decode", "d0", end_after=3))
    c.add("decode", VllmCheckedEngine("decode", "d1", end_after=3))
    c.build()
    r = serve(c, dict(CHAT, n=2, temperature=0.8, stream=True))
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert '"code": 503' in events[-2] and events[-1] == "data: [DONE]"
    assert len(c.engines["d0"].calls) + len(c.engines["d1"].calls) == 1  # no continuation anywhere
    assert c.router.metrics.stream_resumes.labels("exhausted")._value.get() == 1


# ---------------------------------------------------------------------------- /v1/completions prompt lists


@pytest.mark.parametrize("prompt", [["hello there", "general kenobi"], [[5, 6, 7], [8, 9]]], ids=["strings", "ids"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_prompt_list_is_served_whole_on_one_engine(prompt, stream):
    c = vllm_cluster()
    r = serve(c, dict(COMPLETION, prompt=prompt, stream=stream), "completions")
    assert r.status_code == 200, r.text
    assert r.headers["x-pdserve-path"] == "monolithic"
    assert r.headers["x-pdserve-monolithic-cause"] == "several_choices"
    assert c.engines["p0"].calls == []
    (_, dbody), = c.engines["d0"].calls
    assert dbody["prompt"] == prompt and "kv_transfer_params" not in dbody


@pytest.mark.parametrize("prompt", ["hello there", [5, 6, 7], ["hello there"], [[5, 6, 7]]],
                         ids=["string", "ids", "one-string", "one-id-list"])
def test_a_single_prompt_still_takes_the_pd_path(prompt):
    c = vllm_cluster()
    r = serve(c, dict(COMPLETION, prompt=prompt), "completions")
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
    (_, pbody), = c.engines["p0"].calls
    assert pbody["prompt"] == prompt


def test_a_cut_stream_of_a_prompt_list_is_not_resumed():
    from pdserve.decode.resume import StreamTracker

    t = StreamTracker("completions")
    t.prompt_ids = [1, 2]
    ids = {"return_token_ids": True}
    assert t.can_resume(dict(ids, prompt=[1, 2])) and t.can_resume(dict(ids, prompt=["a"]))
    assert not t.can_resume(dict(ids, prompt=["a", "b"])) and not t.can_resume(dict(ids, prompt=[[1], [2]]))


# ---------------------------------------------------------------------------- the router's token ids never leak


def stub_head(text: str) -> tuple[str, int]:
    """The response id and created time of a stub answer (stream or JSON)."""
    first = text.split("\n\n")[0]
    obj = json.loads(first[6:] if first.startswith("data: ") else text)
    return obj["id"], obj["created"]


def vllm_stream(endpoint: str, body: dict, text: str) -> str:
    """The SSE bytes a vLLM server (the stub, which writes them byte for byte) sends for ``body``."""
    rid, created = stub_head(text)
    return "".join(stream_chunks(endpoint, body, request_id=rid, created=created))


BODIES = [("chat", CHAT), ("completions", COMPLETION)]


@pytest.mark.parametrize("endpoint,base", BODIES)
@pytest.mark.parametrize("options", [{}, {"stream_options": {"include_usage": True}}, {"return_token_ids": False}],
                         ids=["plain", "usage", "ids-off"])
def test_a_stream_is_sent_as_vllm_writes_it_without_token_ids(endpoint, base, options):
    body = dict(base, stream=True, **options)
    c = vllm_cluster()
    r = serve(c, body, endpoint)
    assert r.status_code == 200 and r.headers["x-pdserve-path"] == "pd"
    assert r.text == vllm_stream(endpoint, body, r.text)  # the exact bytes
    assert "token_ids\":[" not in r.text and '"token_ids":null' in r.text
    (_, dbody), = c.engines["d0"].calls
    assert dbody["return_token_ids"] is True  # the router still reads them (resume)
    assert c.router.metrics.requests.labels("pd", endpoint, "200")._value.get() == 1


@pytest.mark.parametrize("endpoint,base", BODIES)
def test_a_stream_whose_client_asked_carries_the_token_ids(endpoint, base):
    body = dict(base, stream=True, return_token_ids=True)
    c = vllm_cluster()
    r = serve(c, body, endpoint)
    assert r.text == vllm_stream(endpoint, body, r.text)
    ids, _ = stream_tokens(r.text)
    assert ids == stub_token_ids(6) and '"prompt_token_ids":[' in r.text


@pytest.mark.parametrize("endpoint,base", BODIES)
@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked"])
def test_a_json_answer_is_vllms_own(endpoint, base, asked):
    body = dict(base, **({"return_token_ids": True} if asked else {}))
    c = vllm_cluster()
    r = serve(c, body, endpoint)
    rid, created = stub_head(r.text)
    assert r.json() == json_response(endpoint, body, request_id=rid, created=created, role="decode")
    (_, dbody), = c.engines["d0"].calls
    assert dbody.get("return_token_ids") is (True if asked else None)


@pytest.mark.parametrize("endpoint,base", BODIES)
def test_a_resumed_stream_sends_no_token_ids_either(endpoint, base):
    c = MemoryCluster("pd")
    c.add("prefill", VllmCheckedEngine("prefill", "p0"))
    c.add("decode", VllmCheckedEngine("decode", "d0", break_after=3))
    c.add("decode", VllmCheckedEngine("decode", "d1", break_after=3))
    c.build()
    r = serve(c, dict(base, stream=True), endpoint)
    assert c.router.metrics.stream_resumes.labels("resumed")._value.get() == 1
    _, events = stream_tokens(r.text)
    assert events[-1] == {"done": True} and "token_ids\":[" not in r.text and "token_ids\": [" not in r.text
    pieces = [ch.get("text") or (ch.get("delta") or {}).get("content") or "" for e in events[:-1]
              for ch in e.get("choices") or []]
    pieces = [p for p in pieces if p]
    assert len(pieces) == 6 and "".join(pieces[:3]) == stub_text(3)  # the stub's continuation starts its words anew
    for e in events[:-1]:
        assert e.get("prompt_token_ids") is None
        assert all(ch.get("token_ids") is None and ch.get("prompt_token_ids") is None for ch in e["choices"])


def test_streams_the_router_cannot_resume_are_not_asked_for_token_ids():
    c = vllm_cluster()
    serve(c, dict(COMPLETION, stream=True, echo=True), "completions")  # vLLM echoes no prompt text with ids on
    serve(c, dict(CHAT, stream=True, n=2, temperature=0.8))
    assert [b.get("return_token_ids") for _, b in c.engines["d0"].calls] == [None, None]


def test_hiding_token_ids_is_what_vllm_writes_without_them():
    from pdserve.decode.resume import hide_token_ids

    head = 'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"tiny",'
    sent = (head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                   '"finish_reason":null}],"prompt_token_ids":[1,2,3]}\n\n'
            + head + '"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":null,"token_ids":[9]}]}\n\n'
            + head + '"choices":[{"index":0,"delta":{"content":"\\"token_ids\\":[1]"},"logprobs":null,'
                     '"finish_reason":null,"token_ids":[10,11]}]}\n\n'
            + "data: [DONE]\n\n")
    want = (head + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
                   '"finish_reason":null}],"prompt_token_ids":null}\n\n'
            + head + '"choices":[{"index":0,"delta":{"content":"\\"token_ids\\":[1]"},"logprobs":null,'
                     '"finish_reason":null,"token_ids":null}]}\n\n'
            + "data: [DONE]\n\n")
    assert hide_token_ids(sent) == want
    same = head + '"choices":[{"index":0,"delta":{"content":"a"},"token_ids":null}]}\n\n'
    assert hide_token_ids(same) is same  # nothing to hide: the text itself, untouched
    other = head + '"choices":[{"index":0,"logprob_token_ids":[3],"token_ids":[4]}]}\n\n'
    assert hide_token_ids(other) == head + '"choices":[{"index":0,"logprob_token_ids":[3],"token_ids":null}]}\n\n'
