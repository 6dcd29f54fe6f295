"""An engine replica's refusals (engine/server.py ``EngineServer.handle``) are worded as vLLM's
own server words them: the refusals of vLLM's serving layer reach the client through it."""
from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.server import EngineServer


class _RaisingChat:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def create_chat_completion(self, request, raw_request):
        raise self.exc


def _handle(exc: BaseException, body: dict) -> list[tuple]:
    server = EngineServer.__new__(EngineServer)  # no engine: only the serving layer's answer matters
    server.role, server._chat = "monolithic", _RaisingChat(exc)

    async def collect():
        return [item async for item in server.handle("chat", body)]

    return asyncio.run(collect())


BODY = {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": -1}


def test_a_refusal_keeps_vllms_param():
    """The replica answered param null where vLLM's server names the parameter."""
    from vllm.exceptions import VLLMValidationError

    exc = VLLMValidationError("temperature must be non-negative, got -1.0.", parameter="temperature", value=-1.0)
    assert _handle(exc, BODY) == [("error", 400, {"error": {
        "message": "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)",
        "type": "BadRequestError", "param": "temperature", "code": 400}})]


def test_a_body_that_fails_the_request_model_is_worded_as_vllms_server_words_it():
    (item,) = _handle(AssertionError("not reached"), {"model": "tiny", "messages": "hello"})
    assert item[:2] == ("error", 400)
    assert item[2]["error"]["type"] == "Bad Request" and item[2]["error"]["param"] == "body.messages"


def test_an_engine_failure_is_not_a_refusal():
    """Not the client's fault: it propagates, so the router falls back or resumes."""
    from vllm.exceptions import VLLMServerError

    with pytest.raises(VLLMServerError):
        _handle(VLLMServerError("engine died"), BODY)
