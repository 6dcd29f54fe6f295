"""What the router measures for the disaggregation decider (router/decider.py), kept current
with exponentially weighted averages.

* prefill: a P/D prefill leg's seconds (router-timed) against the prompt tokens the prefill
  engine did not hold plus the prefill backlog it found there (router/prefill_backlog.py),
  divided by (1 + the other requests ahead on that engine: they share its steps) ("pd"); and,
  per pool ("prefill", "decode"), a whole request's TTFT against the same tokens on its engine,
  divided by (1 + requests waiting there besides the backlog): both pools' engines serve whole
  requests alike, so both are measured alike, and the decodes running there are in the fit;
* KV transfers: the decode engines' pull totals between two load polls (every transport
  reports them), as mean bytes and seconds per transfer;
* decode step: each streamed request's TPOT against the requests running on its engine when
  it was sent there;
* output tokens per request, and the share of time prefill engines spend prefilling.

Each model is a line fitted by exponentially weighted least squares (``EwmaLine``), so it
follows the cluster as it changes; over samples that all share one x, or whose fit would start
below zero, it is the mean ratio y / x through the origin; over samples whose fit would slope
down (x does not explain y there), the mean y, flat.
"""
from __future__ import annotations

import time
from typing import Optional

from pdserve.router.decider import Line, Measurements


class EwmaLine:
    """y = fixed + slope * x, fitted over exponentially weighted samples."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.samples = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def add(self, x: float, y: float) -> None:
        a = self.alpha if self.samples else 1.0
        keep = 1 - a
        self._w = keep * self._w + a
        self._x = keep * self._x + a * x
        self._y = keep * self._y + a * y
        self._xx = keep * self._xx + a * x * x
        self._xy = keep * self._xy + a * x * y
        self.samples += 1

    def line(self) -> Optional[Line]:
        if not self.samples:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 1e-9 * max(1.0, mx * mx):
            slope = (self._xy / self._w - mx * my) / var
            if slope < 0:
                # Sloping down: over these samples x does not explain y (a prefix-cached
                # conversation's prefills are short and alike; queues and batches decide their
                # time). The mean, flat: a ratio through the origin would make every short
                # prefill look slow per token and every long one far slower than it is.
                return Line(my, 0.0)
            if my - slope * mx >= 0:
                return Line(my - slope * mx, slope)
        # one x seen, or a fit below zero at x = 0 (a steep line over few samples): the mean
        # ratio through the origin
        return Line(0.0, my / mx) if mx > 0 else Line(my, 0.0)


class Ewma:
    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.value: Optional[float] = None
        self.samples = 0

    def add(self, v: float) -> None:
        self.value = v if self.value is None else (1 - self.alpha) * self.value + self.alpha * v
        self.samples += 1


class LiveMeasurements:
    def __init__(self, alpha: float = 0.2, min_samples: int = 3, clock=time.monotonic) -> None:
        self.min_samples = min_samples
        # "pd": P/D prefill legs; "prefill" / "decode": whole requests on that pool's engines
        self.prefill = {"pd": EwmaLine(alpha), "prefill": EwmaLine(alpha), "decode": EwmaLine(alpha)}
        self.transfer = EwmaLine(alpha)
        self.decode_step = EwmaLine(alpha)
        self.output_tokens = Ewma(alpha)
        self.prefill_busy = Ewma(alpha)
        self._clock = clock
        self._busy_since: Optional[float] = None
        self._busy_s = 0.0

    # ------------------------------------------------------------------ observations
    def prefill_done(self, kind: str, tokens: int, seconds: float, ahead: int = 0, own_share: float = 1.0) -> None:
        """A prefill (``kind``: "pd", or a whole request on a "prefill" or "decode" engine) done
        after ``seconds``, over ``tokens``: its own uncached tokens and those of the prefills
        pending ahead of it, with ``ahead`` more requests sharing the engine's steps. Its own
        part of that work is ``own_share``."""
        line = self.prefill.get(kind)
        if line is None or seconds <= 0:
            return
        line.add(max(0, tokens), seconds / (1 + max(0, ahead)))
        if kind == "pd":  # a prefill engine busy with P/D prefills (a whole request's is in the step fit)
            self._busy_s += own_share * seconds / (1 + max(0, ahead))

    def transfers(self, count: int, total_bytes: int, total_seconds: float) -> None:
        """A decode replica's KV pulls since the last poll."""
        if count > 0 and total_seconds >= 0:
            self.transfer.add(total_bytes / count, total_seconds / count)

    def decoded(self, tpot_s: float, running: int, output_tokens: int) -> None:
        """A finished stream on a decode engine: its TPOT, with ``running`` requests there when it began."""
        if tpot_s > 0:
            self.decode_step.add(max(0, running), tpot_s)
        if output_tokens > 0:
            self.output_tokens.add(output_tokens)

    def poll(self, prefill_replicas: int) -> None:
        """Once per load poll: the share of the last interval prefill engines spent prefilling."""
        now = self._clock()
        if self._busy_since is not None and now > self._busy_since and prefill_replicas > 0:
            share = self._busy_s / ((now - self._busy_since) * prefill_replicas)
            self.prefill_busy.add(min(1.0, share))
        self._busy_since, self._busy_s = now, 0.0

    # ------------------------------------------------------------------ the record the decider reads
    def snapshot(self) -> Measurements:
        n = self.min_samples
        ready = (self.prefill["pd"].samples >= n and self.transfer.samples >= n
                 and self.decode_step.samples >= n)
        return Measurements(
            prefill={pool: line.line() for pool, line in self.prefill.items()},
            transfer=self.transfer.line(), decode_step=self.decode_step.line(),
            prefill_busy=self.prefill_busy.value or 0.0, output_tokens=self.output_tokens.value or 0.0,
            ready=ready)

    def gauges(self) -> dict[str, float]:
        """The decider's inputs, by name, for /metrics."""
        m = self.snapshot()
        out = {"prefill_busy_share": m.prefill_busy, "output_tokens": m.output_tokens, "ready": float(m.ready)}
        for kind, line in m.prefill.items():  # pd_..., prefill_... and decode_prefill_...
            if line is not None:
                out[f"{kind}_prefill_fixed_seconds"] = line.fixed
                out[f"{kind}_prefill_seconds_per_token"] = line.slope
        if m.transfer is not None:
            out["kv_transfer_fixed_seconds"] = m.transfer.fixed
            out["kv_transfer_seconds_per_byte"] = m.transfer.slope
        if m.decode_step is not None:
            out["decode_step_fixed_seconds"] = m.decode_step.fixed
            out["decode_step_seconds_per_running"] = m.decode_step.slope
        return out
