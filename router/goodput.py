"""Live goodput: requests that met every SLO of their class, as a counter and a sliding rate.

A streamed request is judged on TTFT, mean TPOT (when it has two tokens or more) and E2E
(when the class sets one). A non-streamed answer reaches the client all at once, so its
TTFT is its E2E. Requests that end in an error never meet their SLO.
"""
from __future__ import annotations

from collections import deque
from typing import Optional

from pdserve.router.config import SLOSpec


def slo_met(slo: dict[str, Optional[float]], ttft_s: float, tpot_s: Optional[float], e2e_s: float) -> bool:
    if ttft_s * 1000 > slo["ttft_ms"]:
        return False
    if tpot_s is not None and tpot_s * 1000 > slo["tpot_ms"]:
        return False
    return slo["e2e_ms"] is None or e2e_s * 1000 <= slo["e2e_ms"]


class GoodputWindow:
    def __init__(self, slo: SLOSpec) -> None:
        self.slo = slo
        self.window_s = slo.goodput_window_s
        self._met: dict[str, deque] = {}

    def judge(self, priority_class: str, ttft_s: float, tpot_s: Optional[float], e2e_s: float, now: float) -> bool:
        met = slo_met(self.slo.for_class(priority_class), ttft_s, tpot_s, e2e_s)
        if met:
            self._met.setdefault(priority_class, deque()).append(now)
        return met

    def rates(self, now: float) -> dict[str, float]:
        out = {}
        for cls, times in self._met.items():
            while times and times[0] < now - self.window_s:
                times.popleft()
            out[cls] = len(times) / self.window_s
        return out
