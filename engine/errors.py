"""OpenAI-style error bodies, shared by the engine servers and the router."""
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
