"""The one way an admission rule says no: an HTTP status, a reason, and when to come back."""
from __future__ import annotations

from typing import Any, Optional

_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
          429: "RateLimitError", 503: "ServiceUnavailableError"}


class Rejection(Exception):
    def __init__(self, status: int, reason: str, message: str, retry_after_s: Optional[float] = None,
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # metric label: budget_rpm, kv_budget, ladder, queue_timeout, ...
        self.message = message
        self.retry_after_s = retry_after_s
        self.param = param

    @property
    def error_type(self) -> str:
        return _TYPES.get(self.status, "BadRequestError")

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        # Retry-After takes whole seconds; never 0, which invites an immediate retry storm.
        return {"retry-after": str(max(1, int(-(-self.retry_after_s // 1))))}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status}}
