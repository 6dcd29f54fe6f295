"""OpenAI-style error bodies, shared by the engine servers and the router.

``vllm_error`` words an exception raised by vLLM's request models, sampling parameters or
serving layer as vLLM's own server does (its ``create_error_response``).
"""
from __future__ import annotations

from typing import Any, Optional


def error_body(status: int, message: str, type_: str, param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def validation_message(e) -> str:
    """One line from a pydantic ValidationError: 'field.path: problem; ...'."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or str(e)


def vllm_error(exc: Exception) -> tuple[int, dict[str, Any]]:
    """(status, body) vLLM's server answers ``exc`` with (a VLLMValidationError keeps its param)."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    err = create_error_response(exc).error
    return int(err.code), error_body(int(err.code), err.message, err.type, err.param)
