"""The adaptive disaggregation decider: for one request, P/D or whole on one engine.

A pure function over numbers (``Measurements``: what the cluster has measured lately, from
router/measure.py; ``Situation``: this request and the replicas the selection pipelines
chose), so it is tested with hand-made ones. The ways, cheapest first:

* ``decode_local``: the whole request on the chosen decode engine, which prefills it itself:
  one engine, no KV transfer. It stalls the decodes running there for the prefill's length;
* ``prefill_whole``: the whole request on the chosen prefill engine, when it has room: the
  same cost as ``decode_local`` (one engine, no transfer), on the other pool's engine, so the
  two pools lend each other capacity;
* ``pd``: prefill on the prefill engine, KV transfer, decode on the decode engine.

For each way it predicts the request's TTFT and TPOT, and the TPOT of the decodes already
running on the engine whose steps the request's prefill stalls; a way meets the SLOs when
each prediction is within ``headroom`` of its SLO (the request's class SLO; the strictest
class's TPOT for the running decodes, whose classes the router does not track per engine).
Of the two whole ways that meet them, the one that adds the least latency over the request
and the decodes running on its engine (its own TTFT and decode, their stall for its prefill,
their steps slowed by one more request): what each engine caches and what it runs, weighed in
seconds. P/D only when neither whole way meets them and P/D does; when no way does, the whole
way that misses by the least ratio, the engine with fewer requests within ``tie_margin`` (P/D
spends more of an overloaded cluster per request). Only cached tokens
(router/prefix_index.py) are left out of a prefill: a decode engine that already holds most
of a conversation prefills the rest quickly, so repeat turns stay local.

The models, all linear fits the measurements keep current:
  whole-request prefill (per pool)  seconds = fixed + per_token * (its uncached tokens + the
                       uncached tokens of the prefills this router sent that engine and has not
                       yet seen done), times (1 + requests waiting there besides those). An
                       engine prefills what it was sent together, in steps of up to its token
                       budget: a request waits for the tokens ahead of it, not for one whole
                       prefill per request ahead. The requests it runs slow a prefill down, and
                       the fit keeps that. Both whole ways are predicted alike, so neither
                       engine looks cheaper than it is
  P/D prefill leg      the same line over the prefill engine's tokens, times (1 + requests
                       ahead there besides the pending prefills: they share its steps); at
                       least the prefill engine's whole-request prefill
  transfer             seconds = fixed + per_byte * bytes (the decode engine pulls what it
                       does not hold itself)
  decode step          seconds per output token = fixed + per_request * requests running
  a local prefill      delays each running decode by its own length, spread over the half
                       of its output it has left (mean output length / 2)
  a decode on a prefill engine  steps slowed by the share of time that engine prefills; a
                       prefill there (P/D or whole) stalls the decodes it runs, as above
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

WAYS = ("decode_local", "prefill_whole", "pd")  # cheapest first
WHOLE = ("decode_local", "prefill_whole")  # one engine, no transfer: the same cost


@dataclass(frozen=True)
class Line:
    """seconds = fixed + slope * x."""

    fixed: float
    slope: float

    def at(self, x: float) -> float:
        return max(0.0, self.fixed + self.slope * x)


@dataclass(frozen=True)
class Measurements:
    # prefill seconds vs uncached prompt tokens, one request alone: "pd" (a P/D prefill leg),
    # "prefill" / "decode" (a whole request on that pool's engine)
    prefill: dict[str, Optional[Line]] = field(default_factory=dict)
    transfer: Optional[Line] = None  # KV transfer seconds vs bytes
    decode_step: Optional[Line] = None  # seconds per output token vs requests running on the engine
    prefill_busy: float = 0.0  # share of time a prefill engine spends prefilling (0..1)
    output_tokens: float = 0.0  # mean output tokens per request
    ready: bool = False  # enough samples of prefill, transfer and decode step


@dataclass(frozen=True)
class Situation:
    prompt_tokens: int
    kv_bytes_per_token: int
    ttft_slo_s: float  # this request's class
    tpot_slo_s: float
    running_tpot_slo_s: float  # the strictest class's: the decodes running on the decode engine
    prefill_cached: int = 0  # prompt tokens the chosen prefill replica holds
    decode_cached: int = 0  # ... the chosen decode replica holds
    # uncached prompt tokens this router sent the chosen replica to prefill and has not seen done
    prefill_tokens_ahead: int = 0
    decode_tokens_ahead: int = 0
    prefill_ahead: int = 0  # requests the chosen prefill replica runs or queues, besides those pending prefills
    prefill_running: int = 0  # requests it runs
    prefill_waiting: int = 0  # requests queued there, besides the pending prefills
    decode_running: int = 0
    decode_waiting: int = 0
    prefill_room: bool = False  # the prefill replica may take a whole request
    headroom: float = 0.8
    tie_margin: float = 0.0  # whole ways within this of each other's overshoot: fewer requests wins


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    running_tpot_s: float  # the decodes already on the decode engine (0: none there)

    def overshoot(self, s: Situation) -> float:
        """The largest ratio of prediction to SLO (1: exactly at an SLO)."""
        return max(self.ttft_s / s.ttft_slo_s, self.tpot_s / s.tpot_slo_s,
                   self.running_tpot_s / s.running_tpot_slo_s)

    def miss(self, s: Situation) -> Optional[str]:
        """Which SLO this prediction misses (with headroom), or None."""
        h = s.headroom
        if self.ttft_s > h * s.ttft_slo_s:
            return "ttft"
        if self.tpot_s > h * s.tpot_slo_s:
            return "tpot"
        if self.running_tpot_s > h * s.running_tpot_slo_s:
            return "running_tpot"
        return None


@dataclass(frozen=True)
class Decision:
    way: str  # one of WAYS
    reason: str
    predictions: dict[str, Prediction] = field(default_factory=dict)


def predict(m: Measurements, s: Situation) -> dict[str, Prediction]:
    """Each way's predictions. Needs ``m.ready``."""
    step = m.decode_step
    pd_line = m.prefill.get("pd")
    # every engine holds the same weights: a pool without its own fit yet borrows another's
    p_line = m.prefill.get("prefill") or pd_line or m.prefill.get("decode")
    d_line = m.prefill.get("decode") or m.prefill.get("prefill") or pd_line
    n = s.prompt_tokens
    half_output = max(1.0, m.output_tokens / 2)
    tpot_d = step.at(s.decode_running + 1)
    first_d = tpot_d  # the first output token is one decode step

    # a prefill on the prefill engine stalls the whole requests decoding there (any way that uses it)
    tpot_p = step.at(s.prefill_running + 1) / (1 - min(0.9, max(0.0, m.prefill_busy)))
    stalled_p = lambda prefill_s: tpot_p + prefill_s / half_output if s.prefill_running else 0.0  # noqa: E731

    # a whole request's prefill on the prefill engine (the prefill_whole way below)
    prefill_there = p_line.at(n - s.prefill_cached + s.prefill_tokens_ahead) * (1 + s.prefill_waiting)
    prefill_remote = pd_line.at(n - s.prefill_cached + s.prefill_tokens_ahead) * (1 + s.prefill_ahead)
    if m.prefill.get("prefill") is not None:
        # The same engine's whole-request fit, refreshed whenever it serves one: a P/D prefill
        # there takes at least as long. The P/D fit is refreshed only while P/D is chosen; past
        # the knee it is not, and its idle-time figures would make P/D look cheap.
        prefill_remote = max(prefill_remote, prefill_there)
    transfer = m.transfer.at((n - s.decode_cached) * s.kv_bytes_per_token)
    pd = Prediction(prefill_remote + transfer + first_d, tpot_d,
                    max(tpot_d if s.decode_running else 0.0, stalled_p(prefill_remote)))

    prefill_local = d_line.at(n - s.decode_cached + s.decode_tokens_ahead) * (1 + s.decode_waiting)
    local = Prediction(prefill_local + first_d, tpot_d, tpot_d + prefill_local / half_output if s.decode_running else 0.0)

    # the decode engine's decodes are untouched
    whole = Prediction(prefill_there + tpot_p, tpot_p, stalled_p(prefill_there))
    return {"decode_local": local, "prefill_whole": whole, "pd": pd}


def decide(m: Measurements, s: Situation) -> Decision:
    """The way for one request, and why (the reason the metric counts):

    * ``warmup``: too few measurements yet: P/D, as ``always`` would;
    * ``cheapest``: whole on the decode engine, which meets every SLO and adds the least latency;
    * ``least_loaded``: whole on the prefill engine, which meets every SLO and adds less latency
      than the decode engine;
    * ``<way>_<slo>``: a cheaper way was turned down (the decode engine's reason: ``ttft``,
      ``tpot``, ``running_tpot``);
    * ``best_effort``: no way meets every SLO: the whole way that misses by the least (an
      overloaded cluster has no capacity to spare for P/D's extra work).
    """
    if not m.ready:
        return Decision("pd", "warmup")
    preds = predict(m, s)
    allowed = [w for w in WAYS if w != "prefill_whole" or s.prefill_room]
    meets = [w for w in allowed if preds[w].miss(s) is None]
    whole = [w for w in meets if w in WHOLE]
    local_miss = preds["decode_local"].miss(s)
    turned_down = None if local_miss is None else f"decode_local_{local_miss}"
    if whole:
        best = _whole_way(whole, m, preds, s, meet=True)
        if best == "decode_local":
            return Decision(best, "cheapest", preds)
        return Decision(best, turned_down or "least_loaded", preds)
    if "pd" in meets:
        return Decision("pd", turned_down, preds)
    # Past every SLO the cluster is overloaded, and P/D spends more of it per request (a prefill
    # on one engine, the KV transfer, the decode on another): the whole way that misses least.
    return Decision(_whole_way([w for w in allowed if w in WHOLE], m, preds, s, meet=False), "best_effort", preds)


def added_latency(m: Measurements, s: Situation, way: str, p: Prediction) -> float:
    """Seconds of latency a whole way adds, summed over the request and the decodes running on
    its engine: the request's own TTFT and decode (output tokens x TPOT), the running decodes'
    stall for its prefill, and their steps slowed by one more request for its output's length.
    What an engine caches shortens the prefill, paid once by the request and once by every
    decode running there; what it runs lengthens every step. A busy engine that holds the
    conversation can cost more than an idle one that does not."""
    running = s.decode_running if way == "decode_local" else s.prefill_running
    out = max(1.0, m.output_tokens)
    prefill = max(0.0, p.ttft_s - p.tpot_s)  # the first token is one step after the prefill
    slope = max(0.0, m.decode_step.slope) if m.decode_step else 0.0
    return p.ttft_s + out * p.tpot_s + running * (prefill + out * slope)


def _whole_way(ways: list[str], m: Measurements, preds: dict[str, Prediction], s: Situation, meet: bool) -> str:
    """Of two whole ways that both meet the SLOs (``meet``) or both miss them, which one.

    Both meet: the one that adds the least latency over the request and the decodes running
    beside it (``added_latency``). Both miss: the one that misses by the least ratio; within
    ``tie_margin`` of each other, the engine with fewer requests (a queue is counted; the fits'
    noise is not)."""
    if len(ways) == 1:
        return ways[0]
    if meet:
        return min(ways, key=lambda w: (added_latency(m, s, w, preds[w]), WAYS.index(w)))
    best = min(ways, key=lambda w: (preds[w].overshoot(s), WAYS.index(w)))
    if abs(preds[ways[0]].overshoot(s) - preds[ways[1]].overshoot(s)) < s.tie_margin:
        load = {"decode_local": s.decode_running + s.decode_waiting,
                "prefill_whole": s.prefill_running + s.prefill_waiting}
        best = min(ways, key=lambda w: (load[w], WAYS.index(w)))
    return best
