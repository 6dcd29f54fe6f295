"""Request checks the router makes before any engine work, worded as vLLM's own server words them.

The body is checked by vLLM's own code: its request models (pydantic, and the validators they
carry), its output limits (the request's ``build_tok_params``: max_tokens against the context)
and its sampling parameters (``to_sampling_params``, with max_tokens capped to what the context
leaves, as vLLM caps it); each refusal is worded as vLLM's server words it (engine/errors.py). A
P/D prefill leg runs with ``max_tokens=1`` and without the client's min_tokens or logprobs
(prefill/leg.py), so its engine cannot refuse what only those make invalid: checking here
means such a request never reserves prefill KV blocks it would strand.

The prompt itself is left to the engine: its length (vLLM truncates with
``truncate_prompt_tokens``, counts characters before tokens, words each case its own way) and
its chat template (an unknown role, an empty conversation) are refused by the engine's own
serving layer, which a P/D request meets in its prefill leg, before any KV is held. The router
counts the prompt for admission and routing only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

from pdserve.engine.errors import error_body, vllm_error, vllm_json_error, vllm_model_error, vllm_validation_error


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.type, self.param)

    @classmethod
    def of(cls, answer: tuple[int, dict[str, Any]]) -> "ApiError":
        """From a (status, error body) pair (engine/errors.py's vllm_* functions)."""
        status, body = answer
        err = body["error"]
        return cls(status, err["message"], err["type"], err["param"])


JSON_MEDIA_TYPE = "application/json"


def check_media_type(content_type: Optional[str]) -> None:
    """vLLM's server takes JSON bodies only (its validate_json_request)."""
    if (content_type or "").lower().split(";", 1)[0].strip() != JSON_MEDIA_TYPE:
        raise ApiError.of(vllm_validation_error(["Unsupported Media Type: Only 'application/json' is allowed"]))


def parse_json_body(raw: bytes, max_bytes: int) -> Any:
    """The body's JSON value (not necessarily an object: vLLM's request model refuses the rest)."""
    if len(raw) > max_bytes:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {max_bytes}", "RequestTooLargeError")
    if not raw:
        raise ApiError.of(vllm_validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required",
                                                  "input": None}]))
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ApiError.of(vllm_json_error(e))
    except ValueError:  # not UTF-8: FastAPI's own 400, as vLLM's server words an HTTPException
        raise ApiError(400, "There was an error parsing the body", "Bad Request")


def prompt_count(prompt: Any) -> int:
    """How many prompts a /v1/completions ``prompt`` holds, as vLLM reads it: a string or a
    list of token ids is one; a list of strings or of token-id lists is one per element."""
    if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
        return len(prompt)
    return 1


def serves_whole(endpoint: str, body: dict[str, Any]) -> bool:
    """Whether a request asks for several choices (``n`` other than 1, or a /v1/completions
    prompt list: a choice per prompt), which the router serves whole on one engine
    (router/plan.py): vLLM's own serving layer then answers it exactly as vLLM's server
    does, n=0 or a negative n refused with its own 400. A P/D split buys nothing there and
    its prefill leg, one choice of one token, could not stand in for them."""
    n = body.get("n")
    if n is not None and n != 1:
        return True
    return endpoint == "completions" and prompt_count(body.get("prompt")) > 1


@dataclass
class CheckedRequest:
    body: dict[str, Any]
    prompt_tokens: int
    max_tokens: int
    stream: bool
    # The prompt's token ids as the engine will see them (one prompt only), for the prefix index.
    prompt_token_ids: Optional[list[int]] = None
    # Sequences generated, each up to max_tokens: n choices for each prompt of a list.
    sequences: int = 1


# What vLLM's chat serving passes to the template besides the messages (and a client may not
# override through chat_template_kwargs).
_TEMPLATE_RESERVED = frozenset({"chat_template", "conversation", "messages", "tokenize", "tools", "documents",
                                "add_generation_prompt", "continue_final_message"})


def _template_options(body: dict[str, Any]) -> dict[str, Any]:
    """The chat template's inputs as vLLM's chat serving gives them, so the router counts the
    prompt the engine will see: tools, documents, the generation-prompt switches and the
    client's ``chat_template_kwargs``."""
    extra = body.get("chat_template_kwargs") or {}
    options = {k: v for k, v in extra.items() if k not in _TEMPLATE_RESERVED} if isinstance(extra, dict) else {}
    options.update(add_generation_prompt=body.get("add_generation_prompt", True),
                   continue_final_message=body.get("continue_final_message", False))
    if body.get("tools"):
        options["tools"] = body["tools"]
    if body.get("documents"):
        options["documents"] = body["documents"]
    return options


class RequestChecker:
    """Validates bodies with vLLM's own request models, output limits and sampling parameters,
    checks the model name, and counts the prompt (router/protocol.py's docstring)."""

    def __init__(self, served_name: str, model_path: str, max_model_len: int,
                 chat_template: Optional[str] = None) -> None:
        from transformers import AutoTokenizer
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        self.served_name = served_name
        self.max_model_len = max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._fast = getattr(self.tokenizer, "backend_tokenizer", None)
        self._models = {"chat": ChatCompletionRequest, "completions": CompletionRequest}
        # What build_tok_params reads of vLLM's ModelConfig.
        self._limits = SimpleNamespace(max_model_len=max_model_len)
        # The engines' template when the config sets one (a file, or the template itself, as vLLM takes it).
        self._template: dict[str, str] = {}
        if chat_template:
            path = Path(chat_template)
            self._template["chat_template"] = path.read_text() if path.is_file() else chat_template

    def check(self, endpoint: str, body: Any) -> CheckedRequest:
        """In vLLM's server's order: the request model, the model name, the output limit, the
        prompt (left to the engine when it does not fit or does not render), the sampling."""
        req = self._validate(endpoint, body)
        model = body.get("model", self.served_name)
        if model is not None and model != self.served_name:
            raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {self.served_name}.",
                           "NotFoundError", "model")
        try:
            tok_params = req.build_tok_params(self._limits)
        except Exception as e:  # noqa: BLE001 - vLLM's refusal, in vLLM's words
            raise ApiError.of(vllm_error(e))
        prompts = self._prompt_ids(endpoint, body)
        limit = self._prompt_limit(req)
        counts = [min(len(ids), limit) for ids in prompts] if prompts is not None else [0]
        longest = max(counts)
        asked = req.max_completion_tokens if endpoint == "chat" and req.max_completion_tokens is not None \
            else req.max_tokens
        fits = prompts is not None and all(len(ids) <= limit for ids in prompts)
        if fits:
            max_tokens = self._sampling_checked(req, asked, longest)
        else:  # the engine refuses the prompt before it reads any sampling parameter
            max_tokens = max(1, min(asked or self.max_model_len, self.max_model_len - longest))
        return CheckedRequest(body=body, prompt_tokens=sum(counts), max_tokens=max_tokens, stream=bool(req.stream),
                              prompt_token_ids=prompts[0] if prompts is not None and len(prompts) == 1 else None,
                              sequences=len(counts) * max(1, int(getattr(req, "n", None) or 1)))

    def _validate(self, endpoint: str, body: Any):
        """vLLM's request model, as vLLM's server (FastAPI) validates a body against it."""
        from pydantic import ValidationError

        try:
            return self._models[endpoint].model_validate(body, from_attributes=True)
        except ValidationError as e:
            raise ApiError.of(vllm_model_error(e))
        except Exception as e:  # noqa: BLE001 - vLLM's validators raise their own errors (VLLMValidationError)
            raise ApiError.of(vllm_error(e))

    def _prompt_limit(self, req) -> int:
        """The prompt length vLLM keeps: truncate_prompt_tokens (-1: the context less one), else the context."""
        truncate = getattr(req, "truncate_prompt_tokens", None)
        if truncate is None:
            return self.max_model_len
        return self.max_model_len - 1 if truncate < 0 else min(truncate, self.max_model_len)

    def _sampling_checked(self, req, asked: Optional[int], longest: int) -> int:
        """max_tokens as vLLM caps it (get_max_tokens: at most what the context leaves), checked
        with vLLM's own SamplingParams, which refuses e.g. max_tokens < 1 or min_tokens above it."""
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens

        try:
            max_tokens = get_max_tokens(self.max_model_len, asked, longest, {})
            req.to_sampling_params(max_tokens, {})
        except Exception as e:  # noqa: BLE001 - vLLM's refusal, in vLLM's words
            raise ApiError.of(vllm_error(e))
        return max(1, max_tokens)

    def _prompt_ids(self, endpoint: str, body: dict[str, Any]) -> Optional[list[list[int]]]:
        """The token ids of each prompt (one for chat, one per prompt of a completions list), or
        None where only the engine can tell (a chat whose template does not render: the engine
        refuses it in its words; prompt embeddings)."""
        if endpoint == "chat":
            ids = self._chat_ids(body)
            return None if ids is None else [ids]
        prompt = body.get("prompt")
        if prompt is None:  # prompt_embeds only: the engine counts them
            return None
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            return [self._one_ids(p) for p in prompt]  # a list of strings or of token-id lists
        return [self._one_ids(prompt)]

    def _one_ids(self, prompt: Any) -> list[int]:
        """One completions prompt, already validated by vLLM's request model: a string or token ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        return list(prompt)

    def _chat_ids(self, body: dict[str, Any]) -> Optional[list[int]]:
        try:
            text = self.tokenizer.apply_chat_template(body["messages"], tokenize=False, **_template_options(body),
                                                      **self._template)
        except Exception:  # noqa: BLE001 - jinja raises for unknown roles and malformed content
            return None
        # The template writes the special tokens itself, as tokenize=True would encode it;
        # the Rust tokenizer directly skips transformers' per-call wrapping.
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return list(self.tokenizer.encode(text, add_special_tokens=False))
