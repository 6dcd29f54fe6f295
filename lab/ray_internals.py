"""The Ray settings pdserve gives the Ray nodes it starts beyond Ray's documented API, named in
one place (checked against Ray 2.60.0: tests/test_ray_worker_niceness.py).

``RAY_worker_niceness`` (Ray's system config ``worker_niceness``, which a node reads from its
environment when it starts): Ray starts every worker process at nice 15 by default, so every
pdserve replica (the router, the engine replicas) and the vLLM engines they start would run
below Ray's own daemons (GCS, raylet, dashboard agent, log monitor, all at nice 0) and below
any other process on the host, a client included, on the cores they share. A serving node's
engines and router are its work: pdserve starts its Ray nodes (the local instance of
``pdserve serve``, ``pdserve bench`` and the benchmarks; ``pdserve lab``'s hosts) with 0,
unless the environment already sets it. Nodes started by hand (``ray start``) need it in their
environment (docs/operations.md).

This lives in lab/, the lowest layer that starts Ray nodes; cluster/runtime.py uses it too.
"""
from __future__ import annotations

import os
from typing import Mapping

WORKER_NICENESS_ENV = "RAY_worker_niceness"
WORKER_NICENESS = "0"


def node_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a Ray node pdserve starts: pdserve's worker niceness unless ``env`` sets one."""
    return {WORKER_NICENESS_ENV: WORKER_NICENESS, **env}


def use_in_this_process() -> None:
    """Give a Ray node that this process starts (``ray.init()`` with no address) pdserve's worker
    niceness, unless this process's environment already sets one."""
    os.environ.setdefault(WORKER_NICENESS_ENV, WORKER_NICENESS)
