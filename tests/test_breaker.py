"""Per-link circuit breakers: closed -> open -> half-open -> closed, on a driven clock."""
from __future__ import annotations

from pdserve.fallback.breaker import BreakerSettings, LinkBreakers, LinkState


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _breakers(**kw):
    clock = Clock()
    seen = []
    b = LinkBreakers(BreakerSettings(**kw), clock, on_change=lambda p, d, s: seen.append((p, d, s)))
    return b, clock, seen


def test_consecutive_failures_open_only_that_link():
    b, clock, seen = _breakers(failure_threshold=3, open_seconds=5)
    for _ in range(2):
        b.record("p0", "d0", ok=False)
    assert b.available("p0", "d0")
    b.record("p0", "d0", ok=True)  # a success resets the count
    for _ in range(3):
        b.record("p0", "d0", ok=False)
    assert not b.available("p0", "d0")
    assert b.available("p0", "d1") and b.available("p1", "d0")
    assert b.states()[("p0", "d0")] is LinkState.OPEN
    assert ("p0", "d0", LinkState.OPEN) in seen


def test_open_link_turns_half_open_admits_one_probe_and_closes_on_success():
    b, clock, _ = _breakers(failure_threshold=1, open_seconds=5, half_open_probes=1)
    b.record("p", "d", ok=False)
    clock.now = 4.9
    assert not b.available("p", "d")
    clock.now = 5.0
    assert b.available("p", "d")
    assert b.states()[("p", "d")] is LinkState.HALF_OPEN
    b.begin("p", "d")
    assert not b.available("p", "d")  # the one probe slot is taken
    b.record("p", "d", ok=True)
    assert b.states()[("p", "d")] is LinkState.CLOSED and b.available("p", "d")


def test_failed_probe_reopens_for_another_interval():
    b, clock, _ = _breakers(failure_threshold=1, open_seconds=5)
    b.record("p", "d", ok=False)
    clock.now = 6
    b.begin("p", "d")
    b.record("p", "d", ok=False)
    assert b.states()[("p", "d")] is LinkState.OPEN
    clock.now = 10.9
    assert not b.available("p", "d")
    clock.now = 11.0
    assert b.available("p", "d")


def test_abandoned_probe_frees_its_slot_without_judging_the_link():
    b, clock, _ = _breakers(failure_threshold=1, open_seconds=1)
    b.record("p", "d", ok=False)
    clock.now = 1
    b.begin("p", "d")
    assert not b.available("p", "d")
    b.abandon("p", "d")
    assert b.available("p", "d")
    assert b.states()[("p", "d")] is LinkState.HALF_OPEN
