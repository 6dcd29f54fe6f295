"""Per-replica Little's-Law inputs: arrival rate λ and time in system W over a sliding window.

The replica feeds it from its request path; Ray Serve collects ``stats()`` through the
replica's ``record_autoscaling_stats`` and hands them to the pool's autoscaling policy.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable


class LittleMeter:
    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self._arrivals: deque[float] = deque()
        self._done: deque[tuple[float, float]] = deque()  # (finished at, seconds in system)
        self._open: dict[int, float] = {}
        self._next = 0

    def start(self) -> int:
        now = self.clock()
        self._arrivals.append(now)
        token, self._next = self._next, self._next + 1
        self._open[token] = now
        return token

    def finish(self, token: int) -> None:
        began = self._open.pop(token, None)
        if began is not None:
            now = self.clock()
            self._done.append((now, now - began))

    def stats(self) -> dict[str, float]:
        now = self.clock()
        horizon = now - self.window_s
        while self._arrivals and self._arrivals[0] < horizon:
            self._arrivals.popleft()
        while self._done and self._done[0][0] < horizon:
            self._done.popleft()
        # W: finished requests' time in system; requests still open count with their age so far,
        # so a pool whose requests all run long does not read W = 0.
        times = [d for _, d in self._done] + [now - t for t in self._open.values()]
        return {
            "arrival_rps": len(self._arrivals) / self.window_s,
            "w_s": sum(times) / len(times) if times else 0.0,
            "inflight": float(len(self._open)),
        }
