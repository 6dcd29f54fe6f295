"""Online A/B: a configured fraction of a P/D cluster's traffic is served monolithically.

The monolithic arm runs the whole request (prefill and decode) on one decode engine, on the
same hardware as the P/D arm. Assignment is sticky: the session key (a request header,
else the OpenAI ``user`` field) is hashed into [0, 1), so a session stays in one arm for
as long as the fraction does not change. A request with no session key is assigned at random.
"""
from __future__ import annotations

import hashlib
import random
from typing import Any, Mapping, Optional

ARMS = ("pd", "monolithic")


class TrafficSplit:
    def __init__(self, monolithic_fraction: float, session_header: str, salt: str) -> None:
        self.session_header = session_header.lower()
        self.salt = salt
        self.fraction = 0.0
        self.set_fraction(monolithic_fraction)

    def set_fraction(self, fraction: float) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"monolithic_fraction must be a number in [0, 1], got {fraction!r}")
        self.fraction = float(fraction)

    def session_key(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> Optional[str]:
        key = headers.get(self.session_header)
        if not key and isinstance(body.get("user"), str):
            key = body["user"]
        return key or None

    def bucket(self, key: str) -> float:
        digest = hashlib.sha256(f"{self.salt}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64

    def arm(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> str:
        if self.fraction <= 0.0:
            return "pd"
        key = self.session_key(headers, body)
        point = self.bucket(key) if key is not None else random.random()
        return "monolithic" if point < self.fraction else "pd"

    def state(self) -> dict[str, Any]:
        return {"monolithic_fraction": self.fraction, "session_header": self.session_header}
