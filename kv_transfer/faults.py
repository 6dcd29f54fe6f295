"""Faults injected inside the KV transfer path, for chaos runs and tests.

The engine core runs in its own process, so the fault switch is a small JSON file
that the engine's replica writes and the transfer path re-reads when it changes:
no restart, no RPC into the engine loop. An absent file means no faults.

Spec keys (all optional): ``kill_links`` (bool: refuse every transfer), ``fail``
(fraction of transfers that fail), ``corrupt`` (fraction whose data is altered
after its checksum was taken), ``delay_s`` with ``delay_fraction`` (default 1.0),
``force_inline`` (bool, gRPC only: a same-host puller gets the bytes in the stream, as
across hosts, instead of by reference).
"""
from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import dataclass
from typing import Any

_KEYS = {"kill_links", "fail", "corrupt", "delay_s", "delay_fraction", "force_inline"}


@dataclass(frozen=True)
class FaultSpec:
    kill_links: bool = False
    fail: float = 0.0
    corrupt: float = 0.0
    delay_s: float = 0.0
    delay_fraction: float = 1.0
    force_inline: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FaultSpec":
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}; known: {sorted(_KEYS)}")
        spec = cls(**data)
        for name in ("fail", "corrupt", "delay_fraction"):
            value = getattr(spec, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"fault {name!r} must be a fraction in [0, 1], got {value!r}")
        if spec.delay_s < 0:
            raise ValueError("fault 'delay_s' must be >= 0")
        return spec

    def is_empty(self) -> bool:
        return self == FaultSpec()


def fault_file_path(cluster_name: str, role: str, index: int) -> str:
    """Where the fault switch of one engine lives on its node."""
    import tempfile

    return os.path.join(tempfile.gettempdir(), "pdserve-faults", f"{cluster_name}-{role}-{index}.json")


def write_faults(path: str, spec: dict[str, Any] | None) -> FaultSpec:
    """Validates ``spec`` and makes it the current faults at ``path`` (None clears them)."""
    parsed = FaultSpec.from_dict(spec or {})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if parsed.is_empty():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
        return parsed
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)
    return parsed


class FaultSwitch:
    """Reads the fault file when its mtime changes; cheap enough to ask per transfer."""

    def __init__(self, path: str | None, rng: random.Random | None = None):
        self.path = path
        self._rng = rng or random.Random()
        self._stamp: tuple[int, int] | None = None
        self._spec = FaultSpec()
        self._lock = threading.Lock()

    def current(self) -> FaultSpec:
        if not self.path:
            return self._spec
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                self._spec = self._load() if stamp else FaultSpec()
            return self._spec

    def _load(self) -> FaultSpec:
        try:
            with open(self.path) as f:
                return FaultSpec.from_dict(json.load(f))
        except (OSError, ValueError):
            # A half-written or bad file must not take the transfer path down.
            return FaultSpec()

    def roll(self, fraction: float) -> bool:
        return fraction > 0 and self._rng.random() < fraction
