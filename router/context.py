"""One request as the router pipeline follows it from arrival to its last metric."""
from __future__ import annotations

from typing import Any, Optional

from pdserve.admission.controller import Ticket
from pdserve.router.protocol import CheckedRequest


class RequestCtx:
    """What the stages learn about a request and hand on: its tenant and checked body
    (intake), its admission ticket and the response headers so far (admit), and the
    output tokens counted for accounting."""

    def __init__(self, endpoint: str, t0: float, request_headers: Any = None) -> None:
        self.endpoint = endpoint
        self.t0 = t0  # arrival (time.perf_counter())
        self.request_headers = request_headers if request_headers is not None else {}
        self.cls = "none"  # priority class for metrics: "none" until the tenant is known
        self.tenant = None
        self.checked: Optional[CheckedRequest] = None
        self.ticket: Optional[Ticket] = None
        self.headers: dict[str, str] = {}
        self.output_tokens = 0
        self.hide_ids = False  # the router asked for token ids the client did not (router/intake.py)
        self.selection = None  # what replica selection knows of it (router/selection.py SelectionRequest)
        self.prefill = None  # its prefill while pending on an engine (router/prefill_backlog.py Pending)

    @property
    def body(self) -> dict[str, Any]:
        return self.checked.body

    def admitted(self, ticket: Ticket) -> None:
        self.ticket = ticket
        self.cls = ticket.priority_class
