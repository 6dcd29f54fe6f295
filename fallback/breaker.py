"""Circuit breakers per prefill->decode KV link.

A replica can be healthy while its link to one peer is broken (a stale NIXL agent after
a restart, a firewall rule, a dead NIC on one side), so health is kept per pair:

- closed: P/D runs; ``failure_threshold`` consecutive transfer failures open the link;
- open: the pair is not used for P/D (requests fall back to monolithic serving);
  after ``open_seconds`` the link turns half-open;
- half-open: up to ``half_open_probes`` real requests try the link at a time; one
  success closes it, one failure opens it again for another ``open_seconds``.
"""
from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional


class LinkState(str, enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


# The gauge value exported per link.
STATE_VALUE = {LinkState.CLOSED: 0, LinkState.HALF_OPEN: 1, LinkState.OPEN: 2}


@dataclass(frozen=True)
class BreakerSettings:
    failure_threshold: int = 3
    open_seconds: float = 5.0
    half_open_probes: int = 1


class LinkBreaker:
    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.state = LinkState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probes = 0

    def _cool_down(self) -> None:
        if self.state is LinkState.OPEN and self.clock() - self.opened_at >= self.settings.open_seconds:
            self.state = LinkState.HALF_OPEN
            self.probes = 0

    def available(self) -> bool:
        """May a request use this link now? (No side effect.)"""
        self._cool_down()
        if self.state is LinkState.CLOSED:
            return True
        return self.state is LinkState.HALF_OPEN and self.probes < self.settings.half_open_probes

    def begin(self) -> None:
        """A request commits to this link."""
        self._cool_down()
        if self.state is LinkState.HALF_OPEN:
            self.probes += 1

    def abandon(self) -> None:
        """A committed request ended before the link was tested (e.g. its prefill failed)."""
        if self.state is LinkState.HALF_OPEN:
            self.probes = max(0, self.probes - 1)

    def record(self, ok: bool) -> None:
        if self.state is LinkState.HALF_OPEN:
            self.probes = max(0, self.probes - 1)
        if ok:
            self.state, self.failures = LinkState.CLOSED, 0
            return
        self.failures += 1
        if self.state is LinkState.HALF_OPEN or self.failures >= self.settings.failure_threshold:
            self.state = LinkState.OPEN
            self.opened_at = self.clock()


class LinkBreakers:
    """All links' breakers, created on first use; safe to call from the router's threads."""

    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic,
                 on_change: Optional[Callable[[str, str, LinkState], None]] = None):
        self.settings = settings
        self.clock = clock
        self.on_change = on_change
        self._links: dict[tuple[str, str], LinkBreaker] = {}
        self._lock = threading.Lock()

    def _get(self, prefill: str, decode: str) -> LinkBreaker:
        key = (prefill, decode)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = LinkBreaker(self.settings, self.clock)
            if self.on_change is not None:
                self.on_change(prefill, decode, link.state)
        return link

    def available(self, prefill: str, decode: str) -> bool:
        with self._lock:
            link = self._get(prefill, decode)
            before = link.state
            ok = link.available()
            self._notify(prefill, decode, before, link.state)
            return ok

    def begin(self, prefill: str, decode: str) -> None:
        with self._lock:
            link = self._get(prefill, decode)
            before = link.state
            link.begin()
            self._notify(prefill, decode, before, link.state)

    def abandon(self, prefill: str, decode: str) -> None:
        with self._lock:
            self._get(prefill, decode).abandon()

    def record(self, prefill: str, decode: str, ok: bool) -> None:
        with self._lock:
            link = self._get(prefill, decode)
            before = link.state
            link.record(ok)
            self._notify(prefill, decode, before, link.state)

    def states(self) -> dict[tuple[str, str], LinkState]:
        with self._lock:
            out = {}
            for (p, d), link in self._links.items():
                before = link.state
                link._cool_down()
                self._notify(p, d, before, link.state)
                out[(p, d)] = link.state
            return out

    def _notify(self, prefill: str, decode: str, before: LinkState, after: LinkState) -> None:
        if self.on_change is not None and before is not after:
            self.on_change(prefill, decode, after)
