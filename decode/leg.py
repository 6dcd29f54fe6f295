"""The P/D decode leg: the client's body plus the prefill's KV lease, and what the decode
engine reports about pulling that KV.

The decode engine pulls the prompt's KV (NIXL or gRPC, the router does not care) and
reports the pull in a ``("kv", {...})`` item ahead of its first token: ``ok``, ``seconds``,
``bytes``, ``same_host``, or on failure a ``kind`` (``deadline``, ``link``, ...).

Local recompute: decode engines run with kv_load_failure_policy "recompute", so a failed
pull is followed by a full local prefill in the same engine, i.e. monolithic fallback with
no extra hop, before the first token. The router only relabels the request
(``recompute_cause``) and charges the link's breaker.
"""
from __future__ import annotations

from typing import Any, Optional

from pdserve.engine.leg import Leg
from pdserve.fallback.policy import FallbackCause


def decode_body(body: dict[str, Any], kv_params: dict[str, Any]) -> dict[str, Any]:
    """The decode leg's body: the client's, untouched, plus the KV lease to pull."""
    return dict(body, kv_transfer_params=kv_params)


def start_decode(pool, replica_id: str, endpoint: str, body: dict[str, Any], kv_params: dict[str, Any],
                 prefill_s: Optional[float], link: Optional[tuple[str, str]]) -> Leg:
    """Opens the decode leg on ``replica_id``; it remembers its prefill time and P/D link."""
    leg = Leg(pool, replica_id, endpoint, decode_body(body, kv_params))
    leg.prefill_s = prefill_s
    leg.link = link
    return leg


def pull_ok(pull: Optional[dict[str, Any]]) -> bool:
    return pull is not None and bool(pull.get("ok"))


def pull_failed(pull: Optional[dict[str, Any]]) -> bool:
    return pull is not None and not pull.get("ok")


def failure_kind(pull: dict[str, Any]) -> str:
    return pull.get("kind") or "unknown"


def recompute_cause(pull: Optional[dict[str, Any]]) -> Optional[FallbackCause]:
    """The fallback cause of a decode leg whose engine recomputed the prompt after a failed
    pull (None if the pull did not fail): the deadline, or any other transfer failure."""
    if not pull_failed(pull):
        return None
    return FallbackCause.KV_DEADLINE if failure_kind(pull) == "deadline" else FallbackCause.KV_TRANSFER_FAILED


def breakdown_headers(prefill_s: Optional[float], pull: Optional[dict[str, Any]]) -> dict[str, str]:
    """Per-request P/D timing for non-streamed answers (streamed ones go to the TTFT breakdown metric)."""
    out = {}
    if prefill_s is not None:
        out["x-pdserve-prefill-ms"] = f"{prefill_s * 1000:.2f}"
    if pull is not None:
        if pull["ok"]:
            mode = {True: "; mode=same-host", False: "; mode=inline"}.get(pull.get("same_host"), "")
            out["x-pdserve-kv-transfer"] = f"ok; ms={pull['seconds'] * 1000:.2f}; bytes={pull['bytes']}{mode}"
        else:
            out["x-pdserve-kv-transfer"] = f"failed; kind={pull.get('kind')}"
    return out


def ttft_stages(prefill_s: Optional[float], pull: Optional[dict[str, Any]], ttft: float,
                queue_s: float) -> list[tuple[str, float]]:
    """Splits a P/D request's TTFT: admission queue, prefill leg, KV transfer, and the rest
    (routing, decode queue, first step). Empty for a request without a prefill leg."""
    if prefill_s is None:
        return []
    ok = pull_ok(pull)
    transfer = pull["seconds"] if ok else 0.0
    stages = [("queue", queue_s), ("prefill", prefill_s)]
    if ok:
        stages.append(("kv_transfer", transfer))
    stages.append(("decode_first_token", max(0.0, ttft - queue_s - prefill_s - transfer)))
    return stages
