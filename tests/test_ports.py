"""Ports picked for clusters a test or benchmark starts later (bench/ports.py)."""
from __future__ import annotations

import socket

from pdserve.bench import ports


def test_a_picked_port_is_free_and_outside_the_kernels_ephemeral_range():
    low, high = ports.ephemeral_range()
    picked = [ports.free_port() for _ in range(20)]
    assert len(set(picked)) == 20  # never the same port twice
    for port in picked:
        assert not low <= port <= high
        assert port >= ports.FIRST_PORT
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_port_something_listens_on_is_not_free():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert not ports.is_free(s.getsockname()[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not ports.is_free(s.getsockname()[1])  # a wildcard bind conflicts with it


def test_the_range_is_read_from_the_kernels_file(tmp_path):
    f = tmp_path / "ip_local_port_range"
    f.write_text("40000\t50000\n")
    assert ports.ephemeral_range(f) == (40000, 50000)
    for _ in range(10):
        assert not 40000 <= ports.free_port(f) <= 50000
    f.write_text("garbage")
    assert ports.ephemeral_range(f) == (32768, 60999)


def test_when_the_ephemeral_range_covers_everything_the_kernel_picks(tmp_path):
    f = tmp_path / "ip_local_port_range"
    f.write_text("1024 65535")
    port = ports.free_port(f)
    assert 1024 <= port <= 65535
