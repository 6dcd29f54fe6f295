"""Ports for the clusters and servers a benchmark or test starts.

A port picked now is often bound much later: a cluster's router binds its port only after Ray
and the engines have started, minutes on a small machine. A port from the kernel's ephemeral
range (``/proc/sys/net/ipv4/ip_local_port_range``) may be handed out meanwhile, to an outgoing
connection or to a listener on port 0 (Ray's, ZMQ's, the replicas' token streams), and then
the router cannot bind it and the deployment fails. So pick below that range, above Ray's
worker ports (10002-19999 by default), and check that the port is free right now.
"""
from __future__ import annotations

import random
import socket
from pathlib import Path

PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
FIRST_PORT = 20000  # past Ray's default worker ports
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default
_given: set[int] = set()  # never hand the same port out twice in one process


def ephemeral_range(path: Path = PORT_RANGE_FILE) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in path.read_text().split())
        return low, high
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def is_free(port: int) -> bool:
    """Nothing is bound to the port on any address (the wildcard bind conflicts with all)."""
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port(path: Path = PORT_RANGE_FILE) -> int:
    """A free TCP port that the kernel will not hand out on its own, where the machine leaves one."""
    low, high = ephemeral_range(path)
    # Below the ephemeral range if there is room there, else above it.
    spans = [(FIRST_PORT, low - 1), (high + 1, 65535)]
    candidates = [p for a, b in spans if b - a >= 100 for p in random.sample(range(a, b + 1), 200)]
    for port in candidates:
        if port not in _given and is_free(port):
            _given.add(port)
            return port
    # The ephemeral range covers (nearly) every port: the kernel's own pick is as good as any.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
