"""Decode replicas: pull the prompt's KV from prefill (kv_consumer), then generate.

A decode engine holds full weights, so a request sent without ``kv_transfer_params``
is served monolithically here; that is what the fallback path relies on.
"""
from pdserve.engine.replica import EngineReplica


class DecodeServer(EngineReplica):
    role = "decode"


class MonolithicServer(EngineReplica):
    """Full engines with no KV connector: the baseline of every A/B."""

    role = "monolithic"
