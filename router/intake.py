"""The first stages: authenticate the caller, then read and check the body.

Nothing here touches an engine: a request that fails here costs no KV anywhere.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Optional

from fastapi.responses import JSONResponse

from pdserve.admission.rejection import Rejection
from pdserve.router.context import RequestCtx
from pdserve.router.protocol import ApiError, CheckedRequest, check_media_type, parse_json_body, serves_whole

if TYPE_CHECKING:
    from pdserve.router.core import Router


def wants_resume_ids(endpoint: str, checked: CheckedRequest) -> bool:
    """Whether the router asks the engine for token ids, for mid-stream resume: a stream of
    one choice, and not a /v1/completions echo (with return_token_ids vLLM echoes no prompt
    text), so such streams are served exactly as vLLM serves them and are not resumed."""
    body = checked.body
    if not checked.stream or serves_whole(endpoint, body):
        return False
    return not (endpoint == "completions" and body.get("echo"))


class Intake:
    def __init__(self, router: "Router") -> None:
        self.tenants = router.tenants
        self.checker = router.checker
        self.max_body_bytes = router.cfg.router.max_body_bytes
        self.inline_max_bytes = router.cfg.router.inline_check_max_bytes
        self.account = router.account

    async def take(self, ctx: RequestCtx, request: Any) -> Optional[JSONResponse]:
        """Fills ``ctx.tenant`` and ``ctx.checked``; returns the error response of a request refused."""
        try:
            ctx.tenant = self.tenants.authenticate(request.headers)
            ctx.cls = ctx.tenant.priority_class
            check_media_type(request.headers.get("content-type"))
            raw = await request.body()
            # JSON parsing and prompt tokenizing take milliseconds on long prompts: off the event
            # loop, unless the body is small enough that the thread's hop would cost more.
            if len(raw) <= self.inline_max_bytes:
                checked = self._check(ctx.endpoint, raw)
            else:
                checked = await asyncio.to_thread(self._check, ctx.endpoint, raw)
            if wants_resume_ids(ctx.endpoint, checked):
                # Token ids let a broken stream resume elsewhere exactly where it stopped
                # (decode/resume.py); a client that did not ask for them is not sent them.
                ctx.hide_ids = not checked.body.get("return_token_ids")
                checked.body["return_token_ids"] = True
            ctx.checked = checked
        except ApiError as e:
            self.account.answered("none", ctx.endpoint, e.status)
            return JSONResponse(e.body(), status_code=e.status)
        except Rejection as r:
            return self.account.rejected(r, ctx.cls, ctx.endpoint)
        return None

    def _check(self, endpoint: str, raw: bytes) -> CheckedRequest:
        return self.checker.check(endpoint, parse_json_body(raw, self.max_body_bytes))
