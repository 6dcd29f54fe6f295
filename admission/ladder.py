"""The degradation ladder: decode-pool KV pressure (and preemption storms) pick a rung.

KV pressure is the larger of the pool's KV-cache usage and the share its admitted requests
will hold at their max_tokens (admission/fleet_gate.py): reacting to where usage is heading
sheds load before the engines start preempting, not after.

    rung 0  normal
    rung 1  KV > stop_sheddable_above     Sheddable gets 429 + Retry-After
    rung 2  KV > cap_standard_above       Standard max_tokens is capped
    rung 3  KV > degrade_standard_above   Standard goes to the degraded target (header says so)
    rung 4  KV > critical_only_above,     Critical only: Standard 503, Sheddable 429
            or a preemption storm

Rungs are cumulative. Up: as soon as the signal has held for ``sustain_s``, straight to the
rung it calls for. Down: one rung per ``stable_interval_s`` spent below the current rung,
so a signal hovering at a threshold cannot make the ladder flap. A forced rung (game
days) holds until ``auto()``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pdserve.admission.config import LadderSpec

TOP_RUNG = 4
RUNG_NAMES = ("normal", "stop_sheddable", "cap_standard", "degrade_standard", "critical_only")


@dataclass(frozen=True)
class RungActions:
    """What the current rung does to each class (after the feature flags)."""

    shed_sheddable: bool
    standard_max_tokens: Optional[int]
    degrade_standard: bool
    shed_standard: bool


class DegradationLadder:
    def __init__(self, spec: LadderSpec) -> None:
        self.spec = spec
        self.rung = 0
        self.forced: Optional[int] = None
        self._want_since: Optional[float] = None  # when the signal first asked for more than `rung`
        self._calm_since: Optional[float] = None  # when the signal first fell below `rung`
        self.last_signal: tuple[float, float] = (0.0, 0.0)

    def rung_for(self, kv_usage: float, preemptions_per_s: float) -> int:
        s = self.spec
        if kv_usage > s.critical_only_above or preemptions_per_s >= s.preemption_storm_per_s:
            return 4
        for rung, threshold in ((3, s.degrade_standard_above), (2, s.cap_standard_above),
                                (1, s.stop_sheddable_above)):
            if kv_usage > threshold:
                return rung
        return 0

    def observe(self, kv_usage: float, preemptions_per_s: float, now: float) -> int:
        self.last_signal = (kv_usage, preemptions_per_s)
        if self.forced is not None or not self.spec.enabled:
            return self.current
        want = self.rung_for(kv_usage, preemptions_per_s)
        if want > self.rung:
            self._calm_since = None
            if self._want_since is None:
                self._want_since = now
            if now - self._want_since >= self.spec.sustain_s:
                self.rung, self._want_since = want, None
        elif want < self.rung:
            self._want_since = None
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= self.spec.stable_interval_s:
                self.rung -= 1
                self._calm_since = now  # the next step down needs its own stable interval
        else:
            self._want_since = self._calm_since = None
        return self.rung

    def force(self, rung: int) -> None:
        if not 0 <= rung <= TOP_RUNG:
            raise ValueError(f"rung must be 0..{TOP_RUNG}, got {rung}")
        self.forced = rung

    def auto(self) -> None:
        """Back to the signal; starting from the forced rung, so recovery is still one step at a time."""
        if self.forced is not None:
            self.rung = self.forced
        self.forced = None
        self._want_since = self._calm_since = None

    @property
    def current(self) -> int:
        if self.forced is not None:
            return self.forced
        return self.rung if self.spec.enabled else 0

    def actions(self) -> RungActions:
        r, s = self.current, self.spec
        return RungActions(
            shed_sheddable=(r >= 1 and s.stop_sheddable) or (r >= 4 and s.critical_only),
            standard_max_tokens=s.standard_max_tokens_cap if r >= 2 and s.cap_standard else None,
            degrade_standard=r >= 3 and s.degrade_standard and s.degraded_target not in (None, "off"),
            shed_standard=r >= 4 and s.critical_only,
        )

    def state(self) -> dict:
        return {"rung": self.current, "name": RUNG_NAMES[self.current], "forced": self.forced is not None,
                "kv_usage": round(self.last_signal[0], 4), "preemptions_per_s": round(self.last_signal[1], 3)}
