"""Concurrency slots with class reserves (accounting at admission, not partitions).

Of ``capacity`` (the knee concurrency), non-Critical requests may hold at most
capacity x (1 - critical_reserve), and Sheddable at most capacity x sheddable_max_share,
so Critical always finds its reserve free. Critical may use any free slot.
"""
from __future__ import annotations

import math


class ClassSlots:
    def __init__(self, capacity: int, critical_reserve: float, sheddable_max_share: float) -> None:
        self.capacity = capacity
        self.noncritical_cap = max(1, math.floor(capacity * (1 - critical_reserve)))
        self.sheddable_cap = max(1, math.floor(capacity * sheddable_max_share))
        self.inflight = {"critical": 0, "standard": 0, "sheddable": 0}

    @property
    def total(self) -> int:
        return sum(self.inflight.values())

    def can_start(self, priority_class: str) -> bool:
        if self.total >= self.capacity:
            return False
        if priority_class == "critical":
            return True
        noncritical = self.inflight["standard"] + self.inflight["sheddable"]
        if noncritical >= self.noncritical_cap:
            return False
        return priority_class != "sheddable" or self.inflight["sheddable"] < self.sheddable_cap

    def start(self, priority_class: str) -> None:
        self.inflight[priority_class] += 1

    def finish(self, priority_class: str) -> None:
        self.inflight[priority_class] = max(0, self.inflight[priority_class] - 1)
