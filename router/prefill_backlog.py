"""The prefill work this router has handed each replica and not yet seen done, in prompt tokens.

An engine prefills the requests sent to it together, in steps of up to its token budget
(chunked prefill): a request waits for the uncached tokens of the prefills ahead of it, not for
a whole prefill per request ahead, and a replica's load reports (polled every few hundred
milliseconds) do not yet show a burst sent since the last one. The router knows each of its
own requests the moment it sends it: a prefill is *pending* on a replica from the decider's
choice until the request's first item arrives (a whole request) or its prefill leg returns
(P/D), however it ends.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Pending:
    """One request's prefill on ``replica``: its own uncached tokens, and the backlog (tokens,
    requests) it found there when it was sent."""

    replica: str
    tokens: int
    tokens_ahead: int
    requests_ahead: int
    done: bool = False


class PrefillBacklog:
    def __init__(self) -> None:
        self._tokens: dict[str, int] = {}
        self._requests: dict[str, int] = {}

    def tokens(self, replica: str) -> int:
        return self._tokens.get(replica, 0)

    def requests(self, replica: str) -> int:
        return self._requests.get(replica, 0)

    def add(self, replica: str, tokens: int) -> Pending:
        tokens = max(0, int(tokens))
        pending = Pending(replica, tokens, self.tokens(replica), self.requests(replica))
        self._tokens[replica] = pending.tokens_ahead + tokens
        self._requests[replica] = pending.requests_ahead + 1
        return pending

    def done(self, pending: Pending) -> None:
        """The prefill is over (first item, leg returned, or the request ended without one); a
        second call does nothing."""
        if pending.done:
            return
        pending.done = True
        r = pending.replica
        self._tokens[r] = max(0, self._tokens.get(r, 0) - pending.tokens)
        self._requests[r] = max(0, self._requests.get(r, 0) - 1)
        if not self._requests[r]:
            del self._requests[r]
            self._tokens.pop(r, None)

    def snapshot(self) -> dict[str, int]:
        """Pending tokens per replica (for /metrics)."""
        return dict(self._tokens)
