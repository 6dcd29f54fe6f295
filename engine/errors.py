"""OpenAI-style error bodies, shared by the engine servers and the router.

A request vLLM's own server refuses must be refused by pdserve in the same words: the same
status, ``type``, ``param`` and ``message``. ``vllm_error`` words an exception raised by vLLM's
request models, sampling parameters or serving layer as vLLM's server does (its
``create_error_response``); ``vllm_validation_error`` words a body that fails vLLM's request
model as vLLM's server does for FastAPI's RequestValidationError (its
``validation_exception_handler``: "N validation error(s): ...", type "Bad Request", param the
first error's field as ``body.<field>``), and ``vllm_json_error`` a body that is not JSON.
"""
from __future__ import annotations

from typing import Any, Optional


def error_body(status: int, message: str, type_: str, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def vllm_error(exc: Exception) -> tuple[int, dict[str, Any]]:
    """(status, body) vLLM's server answers ``exc`` with (a VLLMValidationError keeps its param)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    err = create_error_response(exc).error
    return int(err.code), error_body(int(err.code), err.message, err.type, err.param)


def vllm_validation_error(errors: list[Any]) -> tuple[int, dict[str, Any]]:
    """(400, body) for FastAPI-style validation errors (dicts whose ``loc`` starts with "body",
    or plain messages), worded by vLLM's own handler. Reaches into vLLM internals
    (kv_transfer/vllm_internals.py)."""
    from vllm.entrypoints.serve.exception_handling.handlers import validation as v
    from vllm.entrypoints.serve.exception_handling.utils import sanitize_message
    from vllm.exceptions import VLLMValidationError

    param = None
    for error in errors:
        ctx_error = (error.get("ctx") or {}).get("error") if isinstance(error, dict) else None
        if isinstance(ctx_error, VLLMValidationError):
            param = ctx_error.parameter
            break
    first = errors[0] if errors and isinstance(errors[0], dict) else {}
    if param is None and first.get("loc"):
        param = v.clean_loc_for_param(tuple(first["loc"]))
    if errors:
        label = "error" if len(errors) == 1 else "errors"
        reported = errors[:v._MAX_REPORTED_ERRORS]
        message = f"{len(errors)} validation {label}:\n" + "".join(f"  {v._format_error(e)}\n" for e in reported)
        if len(errors) > len(reported):
            message += f"  ...and {len(errors) - len(reported)} more {label}\n"
        message = message.rstrip()
    else:
        message = "Validation error"
    return 400, error_body(400, sanitize_message(message), "Bad Request", param)


def vllm_model_error(e) -> tuple[int, dict[str, Any]]:
    """A pydantic ValidationError of vLLM's request model, as FastAPI reports a body that fails it."""
    return vllm_validation_error([{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors(include_url=False)])


def vllm_json_error(e) -> tuple[int, dict[str, Any]]:
    """A body that is not JSON (a json.JSONDecodeError), as FastAPI reports it."""
    return vllm_validation_error([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                   "input": {}, "ctx": {"error": e.msg}}])
