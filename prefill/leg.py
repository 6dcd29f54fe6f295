"""The P/D prefill leg, as the router runs it.

The prefill leg is the client's body with ``max_tokens=1``, not streamed, and the KV
connector's ``kv_transfer_params`` asking the engine to keep the prompt's KV for a remote
decode (``do_remote_decode``). The engine computes the prompt's KV, holds it, and answers
with ``kv_transfer_params`` of its own: a *lease* on that KV (see ``KVLease``).

Every way this leg can fail before a decode leg starts has a ``FallbackCause``
(fallback/policy.py); the router then serves the request whole on another engine. A 4xx
answer is the client's fault and goes back to the client as it is.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from pdserve.engine.leg import Leg, LegLost
from pdserve.fallback.policy import FallbackCause
from pdserve.kv_transfer.registry import prefill_request_params

logger = logging.getLogger("pdserve.router")

# Fields of the client's body a one-token, non-streamed prefill call must not carry: valid
# for the whole request, vLLM refuses them next to ``max_tokens=1, stream=False`` (min_tokens
# above 1, stream_options without a stream, logprob_token_ids without logprobs) or they
# would change what the leg computes (a second max, logprobs, n). The decode leg (or a
# whole-request fallback) keeps the client's values.
PREFILL_DROP = ("stream_options", "max_completion_tokens", "min_tokens", "logprobs", "top_logprobs",
                "logprob_token_ids", "n")


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg's body: the client's, one token, not streamed, KV kept for a remote decode."""
    pbody = {k: v for k, v in body.items() if k not in PREFILL_DROP}
    pbody.update(max_tokens=1, stream=False, kv_transfer_params=prefill_request_params())
    return pbody


@dataclass
class KVLease:
    """The prefill engine's ``kv_transfer_params``: a claim on the prompt's KV, which the
    engine holds for a limited time for one decode engine to pull. The router passes it on
    untouched but for the pull's deadline, which it takes from the request's TTFT budget:
    what the prefill leg left of it, clamped to the fallback settings' bounds. A decode
    engine that misses the deadline (or finds the lease gone) recomputes the prompt locally
    (decode/leg.py)."""

    params: dict[str, Any]

    @staticmethod
    def deadline_s(ttft_budget_s: float, elapsed_s: float, min_s: float, max_s: float) -> float:
        return round(min(max_s, max(min_s, ttft_budget_s - elapsed_s)), 3)

    def for_decode(self, deadline_s: float) -> dict[str, Any]:
        """The params a decode leg sends: the lease plus its transfer deadline."""
        return dict(self.params, transfer_deadline_s=deadline_s)


@dataclass
class PrefillResult:
    """How a prefill leg ended: a lease, a fallback cause, or a 4xx to return as it is."""

    lease: Optional[KVLease] = None
    cause: Optional[FallbackCause] = None
    client_error: Optional[tuple[int, dict[str, Any]]] = None  # (status, body)
    seconds: Optional[float] = None  # set when the engine answered (an error item included)


async def await_answer(leg: Leg, pool, replica_id: str, timeout_s: float,
                       poll_s: float) -> tuple[Optional[tuple], Optional[FallbackCause]]:
    """Wait for the prefill answer; give up early if its replica is seen to die."""
    task = asyncio.ensure_future(leg.next_item())
    deadline = time.perf_counter() + timeout_s
    try:
        while True:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return None, FallbackCause.PREFILL_TIMEOUT
            done, _ = await asyncio.wait({task}, timeout=min(remaining, poll_s))
            if done:
                return task.result(), None
            if not pool.is_healthy(replica_id):
                return None, FallbackCause.PREFILL_REPLICA_LOST
    except LegLost:
        return None, FallbackCause.PREFILL_REPLICA_LOST
    except Exception as e:
        logger.warning("prefill leg on %s failed: %r", replica_id, e)
        return None, FallbackCause.PREFILL_ERROR
    finally:
        if not task.done():
            task.cancel()
            leg.cancel()


def read_answer(item: Optional[tuple], cause: Optional[FallbackCause],
                seconds: Optional[float]) -> PrefillResult:
    """What the router does with the prefill leg's first item (or its failure)."""
    if cause is None and item is None:
        return PrefillResult(cause=FallbackCause.PREFILL_ERROR)  # the stream ended without an answer
    if cause is not None:
        return PrefillResult(cause=cause)
    if item[0] == "error":
        status = item[1]
        if 400 <= status < 500:
            return PrefillResult(client_error=(status, item[2]), seconds=seconds)
        return PrefillResult(cause=FallbackCause.PREFILL_ERROR, seconds=seconds)
    kv_params = item[1].get("kv_transfer_params")
    if not kv_params:
        return PrefillResult(cause=FallbackCause.NO_KV_PARAMS, seconds=seconds)
    return PrefillResult(lease=KVLease(kv_params), seconds=seconds)


async def run_prefill(pool, replica_id: str, endpoint: str, body: dict[str, Any], timeout_s: float,
                      poll_s: float) -> PrefillResult:
    """Runs the prefill leg of ``body`` on ``replica_id`` and reads its answer."""
    t = time.perf_counter()
    leg = Leg(pool, replica_id, endpoint, prefill_body(body))
    with pool.track(replica_id):
        item, cause = await await_answer(leg, pool, replica_id, timeout_s, poll_s)
    seconds = time.perf_counter() - t if cause is None and item is not None else None
    return read_answer(item, cause, seconds)
