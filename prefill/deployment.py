"""Prefill replicas: compute the prompt's KV and hold it for a remote decode (kv_producer)."""
from pdserve.engine.replica import EngineReplica


class PrefillServer(EngineReplica):
    role = "prefill"
