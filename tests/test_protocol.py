"""The router's own request checks, without engines: they run before any engine work."""
import pytest

from pdserve.engine.tiny_model import resolve_model
from pdserve.router.protocol import ApiError, RequestChecker, parse_json_body


@pytest.fixture(scope="module")
def checker():
    return RequestChecker("tiny", resolve_model("builtin:tiny"), max_model_len=256)


def _chat(content, **kw):
    return dict({"model": "tiny", "messages": [{"role": "user", "content": content}]}, **kw)


def test_counts_prompt_tokens_like_the_chat_template(checker):
    tok = checker.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True)
    ids = ids if isinstance(ids, list) else ids["input_ids"]
    c = checker.check("chat", _chat("hello world", max_tokens=5))
    assert c.prompt_tokens == len(ids) > 5
    assert c.max_tokens == 5 and not c.stream


def test_prompt_plus_max_tokens_over_the_context_is_capped_as_vllm_caps_it(checker):
    """vLLM's server serves such a request, its max_tokens cut to what the context leaves
    (the router used to refuse it with a 400 of its own)."""
    n = checker.check("chat", _chat("word " * 20, max_tokens=1)).prompt_tokens
    assert checker.check("chat", _chat("word " * 20, max_tokens=256 - n)).max_tokens == 256 - n
    assert checker.check("chat", _chat("word " * 20, max_tokens=256 - n + 9)).max_tokens == 256 - n
    assert checker.check("chat", _chat("word " * 20, max_completion_tokens=250)).max_tokens == 256 - n


def test_a_prompt_the_context_cannot_hold_is_left_to_the_engine(checker):
    """vLLM words an over-long prompt its own way (characters or tokens, 'at least' after its
    truncated tokenizing) and truncates it with truncate_prompt_tokens: the engine's serving
    layer refuses it, before any KV (a P/D request in its prefill leg); the router counts it at
    most a context's worth."""
    c = checker.check("chat", _chat("word " * 300, max_tokens=4))
    assert c.prompt_tokens == 256
    c = checker.check("chat", _chat("word " * 300, max_tokens=4, truncate_prompt_tokens=64))
    assert c.prompt_tokens == 64 and c.max_tokens == 4
    c = checker.check("completions", {"model": "tiny", "prompt": [[1] * 300, [2, 3]], "max_tokens": 4})
    assert c.prompt_tokens == 256 + 2


def test_max_tokens_beyond_the_context_is_refused_in_vllms_words(checker):
    with pytest.raises(ApiError) as e:
        checker.check("chat", _chat("x", max_tokens=300))
    assert (e.value.status, e.value.type, e.value.param) == (400, "BadRequestError", "max_tokens")
    assert e.value.message == ("max_tokens=300 cannot be greater than max_model_len=256. Please request fewer "
                               "output tokens. (parameter=max_tokens, value=300)")
    with pytest.raises(ApiError) as e:
        checker.check("chat", _chat("x", max_completion_tokens=300))
    assert e.value.param == "max_completion_tokens"


def test_default_max_tokens(checker):
    c = checker.check("chat", _chat("hi"))  # chat: the rest of the context
    assert c.max_tokens == 256 - c.prompt_tokens
    c = checker.check("completions", {"model": "tiny", "prompt": [1, 2, 3]})  # completions: OpenAI's 16
    assert c.prompt_tokens == 3 and c.max_tokens == 16


def test_what_only_the_chat_template_refuses_is_left_to_the_engine(checker):
    """An empty conversation, an unknown role: vLLM's serving layer refuses them in its words."""
    checker.check("chat", {"model": "tiny", "messages": [], "max_tokens": 4})
    checker.check("chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}], "max_tokens": 4})


# vLLM's own server's answers (vllm 0.32.0, recorded by bench/fidelity.py) to bodies the router refuses.
VLLM_REFUSALS = [
    (_chat("x", max_tokens=0), "BadRequestError", "max_tokens",
     "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
    (_chat("x", max_completion_tokens=0), "BadRequestError", "max_tokens",
     "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
    (_chat("x", max_tokens=2, min_tokens=5), "BadRequestError", None,
     "min_tokens must be less than or equal to max_tokens=2, got 5."),
    (_chat("x", temperature=-1), "BadRequestError", "temperature",
     "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)"),
    (_chat("x", n=3, temperature=0), "BadRequestError", None, "n must be 1 when using greedy sampling, got 3."),
    (_chat("x", presence_penalty=3.0), "BadRequestError", None, "presence_penalty must be in [-2, 2], got 3.0."),
    ({"model": "tiny", "max_tokens": 4}, "Bad Request", "body.messages",
     "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', "
     "'input': '<dict of 2 items>'}"),
    ({"model": "tiny", "messages": "hello"}, "Bad Request", "body.messages",
     "1 validation error:\n  {'type': 'list_type', 'loc': 'body.messages', 'msg': 'Input should be a valid list', "
     "'input': 'hello'}"),
    (_chat("x", max_tokens="many"), "Bad Request", "body.max_tokens",
     "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid "
     "integer, unable to parse string as an integer', 'input': 'many'}"),
    ([1, 2, 3], "Bad Request", "body",
     "1 validation error:\n  {'type': 'model_attributes_type', 'loc': 'body', 'msg': 'Input should be a valid "
     "dictionary or object to extract fields from', 'input': '<list of 3 items>'}"),
]


@pytest.mark.parametrize("body,type_,param,message", VLLM_REFUSALS, ids=[m[:40] for *_, m in VLLM_REFUSALS])
def test_refusals_are_worded_as_vllms_server_words_them(checker, body, type_, param, message):
    """Each was a 400 in the router's words, with another type or param."""
    with pytest.raises(ApiError) as e:
        checker.check("chat", body)
    assert (e.value.status, e.value.type, e.value.param, e.value.message) == (400, type_, param, message)


def test_completions_refusals_are_worded_as_vllms_server_words_them(checker):
    with pytest.raises(ApiError) as e:
        checker.check("completions", {"model": "tiny", "max_tokens": 4})
    assert (e.value.status, e.value.param) == (400, "prompt")
    assert e.value.message == "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"


def test_unknown_models_get_vllms_404(checker):
    with pytest.raises(ApiError) as e:
        checker.check("chat", {"model": "other", "messages": [{"role": "user", "content": "x"}]})
    assert e.value.body() == {"error": {"message": "The model `other` does not exist. Valid aliases: tiny.",
                                        "type": "NotFoundError", "param": "model", "code": 404}}


def test_bodies_that_are_not_json_get_fastapis_words_as_vllm_sends_them():
    from pdserve.router.protocol import check_media_type

    with pytest.raises(ApiError) as e:
        parse_json_body(b'{"model": "tiny", "messages": [', max_bytes=1024)
    assert (e.value.type, e.value.param) == ("Bad Request", "body.31")
    assert e.value.message == ("1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.31', 'msg': 'JSON "
                               "decode error', 'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting value'}}")
    with pytest.raises(ApiError) as e:
        check_media_type("text/plain")
    assert (e.value.status, e.value.type, e.value.param) == (400, "Bad Request", None)
    assert e.value.message == "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed"
    check_media_type("application/json; charset=utf-8")


@pytest.mark.parametrize("endpoint,body,param,message", [
    ("chat", _chat("x", stream=True, prompt_logprobs=1), "prompt_logprobs",
     "`prompt_logprobs` are not available when `stream=True`. (parameter=prompt_logprobs)"),
    ("chat", _chat("x", stream_options={"include_usage": True}), "stream_options",
     "Stream options can only be defined when `stream=True`. (parameter=stream_options)"),
    ("chat", _chat("x", tool_choice="required"), "tool_choice",
     "When using `tool_choice`, `tools` must be set. (parameter=tool_choice)"),
    ("completions", {"model": "tiny", "prompt": "", "max_tokens": 4}, "prompt",
     "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"),
], ids=["prompt_logprobs-stream", "stream_options", "tool_choice", "empty-prompt"])
def test_vllms_own_validator_errors_are_400s_in_its_words(checker, endpoint, body, param, message):
    """vLLM's request models raise VLLMValidationError, which is no pydantic ValidationError:
    it escaped the router as a 500 (and uvicorn dropped the connection). vLLM's server answers
    400 with the error's own param (words recorded from vLLM's server by bench/fidelity.py)."""
    with pytest.raises(ApiError) as e:
        checker.check(endpoint, body)
    assert (e.value.status, e.value.type, e.value.param, e.value.message) == (400, "BadRequestError", param, message)


def test_body_parsing():
    with pytest.raises(ApiError) as e:
        parse_json_body(b"x" * 2000, max_bytes=1024)
    assert e.value.status == 413
    with pytest.raises(ApiError):
        parse_json_body(b"{nope", max_bytes=1024)
    assert parse_json_body(b'{"a": 1}', max_bytes=1024) == {"a": 1}


def test_min_tokens_above_max_tokens_is_refused_with_vllms_message(checker):
    assert checker.check("chat", _chat("x", max_tokens=6, min_tokens=6)).max_tokens == 6
    assert checker.check("chat", _chat("x", max_completion_tokens=6, min_tokens=5)).max_tokens == 6
    with pytest.raises(ApiError) as e:
        checker.check("chat", _chat("x", max_tokens=6, min_tokens=7))
    assert e.value.status == 400 and e.value.message == "min_tokens must be less than or equal to max_tokens=6, got 7."


def test_several_choices_pass_the_checks_as_vllm_serves_them(checker):
    for n in (2, 3):  # vLLM's own server accepts n up to its limit; n=0 and below its engine refuses
        assert checker.check("chat", _chat("x", n=n, temperature=0.7, max_tokens=4)).max_tokens == 4


@pytest.mark.parametrize("prompt,count", [("hello world", 1), ([5, 6, 7], 1), (["hello world"], 1), ([[5, 6, 7]], 1),
                                          (["hello world", "hi"], 2), ([[5, 6, 7], [8, 9]], 2)])
def test_completions_prompt_lists_are_a_prompt_each(checker, prompt, count):
    from pdserve.router.protocol import prompt_count, serves_whole

    c = checker.check("completions", {"model": "tiny", "prompt": prompt, "max_tokens": 4})
    body = {"prompt": prompt}
    assert prompt_count(prompt) == count and serves_whole("completions", body) == (count > 1)
    single = checker.check("completions", {"model": "tiny", "prompt": prompt[0] if count > 1 else prompt}).prompt_tokens
    assert c.prompt_tokens >= single and c.max_tokens == 4
    if prompt == [[5, 6, 7], [8, 9]]:
        assert c.prompt_tokens == 5


def test_max_tokens_of_a_prompt_list_is_capped_by_its_longest_prompt(checker):
    long = [1] * 250
    assert checker.check("completions", {"model": "tiny", "prompt": [long, [2, 3]], "max_tokens": 6}).max_tokens == 6
    assert checker.check("completions", {"model": "tiny", "prompt": [[2, 3], long], "max_tokens": 7}).max_tokens == 6


def test_the_prompt_is_counted_with_the_template_options_vllm_uses(checker, monkeypatch):
    msgs = [{"role": "user", "content": "hello there"}]
    with_prompt = checker.check("chat", {"messages": msgs}).prompt_tokens
    without = checker.check("chat", {"messages": msgs, "add_generation_prompt": False}).prompt_tokens
    assert without < with_prompt  # the assistant header is not written
    seen = {}
    real = checker.tokenizer.apply_chat_template

    def spy(messages, **kwargs):
        seen.update(kwargs)
        return real(messages, **kwargs)

    monkeypatch.setattr(checker.tokenizer, "apply_chat_template", spy)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    checker.check("chat", {"messages": msgs, "tools": tools, "chat_template_kwargs": {"flavour": 1, "tokenize": True}})
    assert seen["tools"] == tools and seen["flavour"] == 1 and seen["tokenize"] is False


def test_sequences_count_choices_and_prompts(checker):
    """What admission charges for: n choices for each prompt of a completions list."""
    assert checker.check("chat", _chat("hi", max_tokens=5)).sequences == 1
    assert checker.check("chat", _chat("hi", max_tokens=5, n=3)).sequences == 3
    body = {"model": "tiny", "prompt": ["a b", "c d"], "max_tokens": 5, "n": 2}
    assert checker.check("completions", body).sequences == 4
