"""Network faults between lab hosts, entered in the kernel: tests on three namespaces of our own.

The namespace tests need root and `ip netns`; they skip without them. Their sockets are made by a
thread that entered the host's namespace (a socket keeps the namespace it was made in), so the
servers and clients all run in this process. Timing bounds are wide: the box is small and noisy.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from pdserve.lab import netfaults
from pdserve.lab.errors import LabError
from pdserve.lab.kernel_rules import (
    DropRule, QueueRule, ShapedClass, iptables_restore_input, nft_script, rate_bits_per_second, tc_batch)
from pdserve.lab.netfaults import Endpoint, LinkFault, active_faults, apply_fault, clear_faults

ECHO_PORT, UDP_PORT, BULK_PORT = 7000, 7001, 7002
CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33  # Linux; the socket module does not name it
T = TypeVar("T")


# --- without root: validation, rendering, the errors that name their fix ---------------------

@pytest.mark.parametrize(("fields", "named"), [
    ({"loss_pct": 150}, "loss_pct"),
    ({"delay_ms": -1}, "delay_ms"),
    ({"jitter_ms": 5}, "jitter_ms"),
    ({"rate": "fast"}, "rate"),
    ({"rate": "100"}, "rate"),
    ({"down": True, "loss_pct": 10}, "down"),
    ({}, "at least one"),
])
def test_link_fault_validation_names_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        LinkFault(**fields)


def test_link_fault_accepts_tc_rates() -> None:
    assert rate_bits_per_second("10gbit") == 10e9
    assert rate_bits_per_second("100Mbit") == 100e6
    assert rate_bits_per_second("1mibps") == 8 * 2**20
    LinkFault(delay_ms=5, jitter_ms=1, rate="50mbit", loss_pct=0.5)


def test_endpoint_defaults_its_bridge_port_to_the_lab_naming() -> None:
    assert Endpoint("prefill-long-name", "pdlab-prefill-long-name", "10.77.0.3").bridge_port == "pdl-prefill-lon"
    with pytest.raises(ValueError, match="IPv4"):
        Endpoint("x", "pdlab-x", "not-an-address")


def test_rules_render_pair_and_everyone_faults() -> None:
    script = nft_script("pdlab", "eth0", "saddr", [DropRule("10.0.0.2", None), DropRule(None, 30.0)])
    assert 'hook ingress device "eth0"' in script
    assert "ip saddr 10.0.0.2 drop" in script and "numgen random mod 10000 < 3000 drop" in script
    assert nft_script("pdlab", "eth0", "saddr", []) == "table netdev pdlab {}\ndelete table netdev pdlab\n"
    batch = tc_batch("eth0", [ShapedClass(None, "1gbit"), ShapedClass("10.0.0.2", "50mbit")])
    # The peer class comes first (1:10), the default class takes the rest (1:11).
    assert "htb default 11" in batch
    assert "match ip dst 10.0.0.2/32 flowid 1:10" in batch and "netem" not in batch
    restore = iptables_restore_input([QueueRule("pdl-a", None, 2), QueueRule("pdl-a", "pdl-b", 1)])
    # The pair's rule first: iptables stops at the first NFQUEUE.
    assert restore.index("--physdev-in pdl-a --physdev-out pdl-b -j NFQUEUE --queue-num 1") < restore.index(
        "--physdev-in pdl-a -j NFQUEUE --queue-num 2")


def test_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    a, b = Endpoint("a", "pdlab-a", "10.9.9.2"), Endpoint("b", "pdlab-b", "10.9.9.3")
    monkeypatch.setattr(netfaults.os, "geteuid", lambda: 1000)
    with pytest.raises(LabError, match="run as root"):
        apply_fault(a, b, LinkFault(down=True), state_dir=tmp_path)
    monkeypatch.setattr(netfaults.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netfaults.shutil, "which", lambda command: None if command == "nft" else "/usr/bin/" + command)
    with pytest.raises(LabError, match="Debian package nftables"):
        apply_fault(a, b, LinkFault(loss_pct=5), state_dir=tmp_path)


# --- as root, on three namespaces of our own --------------------------------------------------

def _ip_netns_usable() -> str | None:
    if os.geteuid() != 0:
        return "network faults need root"
    if shutil.which("ip") is None or shutil.which("nft") is None or shutil.which("iptables-legacy") is None:
        return "needs ip, nft and iptables-legacy (make setup installs them)"
    probe = f"pdt-{os.getpid()}-probe"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode:
        return "`ip netns add` is refused here"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


_skip_reason = _ip_netns_usable() if os.name == "posix" else "Linux only"
needs_namespaces = pytest.mark.skipif(_skip_reason is not None, reason=_skip_reason or "")
_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(netns: str, make: Callable[[], T]) -> T:
    """make() run by a thread inside the namespace (setns moves only the calling thread)."""
    outcome: dict[str, object] = {}

    def enter_and_make() -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), f"setns into {netns}")
            outcome["value"] = make()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error
        finally:
            os.close(fd)

    thread = threading.Thread(target=enter_and_make)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


@dataclass
class Host:
    endpoint: Endpoint
    udp_received: Counter

    @property
    def ip(self) -> str:
        return self.endpoint.address

    def socket(self, kind: int = socket.SOCK_STREAM) -> socket.socket:
        sock = _in_netns(self.endpoint.netns, lambda: socket.socket(socket.AF_INET, kind))
        # Closing resets at once: a socket left closing would keep its namespace alive for minutes
        # after `ip netns del` (accepted sockets inherit this from their listener).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return sock


def _serve(listener: socket.socket, handle: Callable[[socket.socket], None],
           connections: list[socket.socket]) -> None:
    def serve_one(conn: socket.socket) -> None:
        with conn:
            try:
                handle(conn)
            except OSError:
                pass  # the client reset it, or teardown closed it

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            connections.append(conn)
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(65536):
        conn.sendall(data)


def _bulk_sink(conn: socket.socket) -> None:
    """Read to EOF, then answer with the byte count: the sender's clock stops when all arrived."""
    total = 0
    while data := conn.recv(1 << 20):
        total += len(data)
    conn.sendall(total.to_bytes(8, "big"))


def _udp_sink(sock: socket.socket, received: Counter) -> None:
    while True:
        try:
            data = sock.recv(2048)
        except OSError:
            return
        received[data[:16]] += 1


def _start_servers(host: Host, sockets: list[socket.socket]) -> None:
    """Echo, bulk and UDP servers on the host; every socket they open is added to `sockets`."""
    for port, handle in ((ECHO_PORT, _echo), (BULK_PORT, _bulk_sink)):
        listener = host.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host.ip, port))
        listener.listen(64)
        sockets.append(listener)
        _serve(listener, handle, sockets)
    udp = host.socket(socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
    udp.bind((host.ip, UDP_PORT))
    sockets.append(udp)
    threading.Thread(target=_udp_sink, args=(udp, host.udp_received), daemon=True).start()


def _sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


@dataclass
class Lab:
    a: Host
    b: Host
    c: Host
    state_dir: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    pid = os.getpid()
    subnet = f"10.213.{pid % 250}"
    bridge = f"pdtbr{pid}"
    hosts: dict[str, Host] = {}
    sockets: list[socket.socket] = []
    state_dir = tmp_path_factory.mktemp("lab-state")
    try:
        _sh("ip", "link", "add", bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{subnet}.1/24", "dev", bridge)
        _sh("ip", "link", "set", bridge, "up")
        for number, name in enumerate("abc", start=2):
            netns, port, inner = f"pdt-{pid}-{name}", f"pdtv{pid}{name}", f"pdtp{pid}{name}"
            _sh("ip", "netns", "add", netns)
            _sh("ip", "link", "add", port, "type", "veth", "peer", "name", inner)
            _sh("ip", "link", "set", inner, "netns", netns)
            _sh("ip", "-n", netns, "link", "set", inner, "name", "eth0")
            _sh("ip", "-n", netns, "addr", "add", f"{subnet}.{number}/24", "dev", "eth0")
            _sh("ip", "-n", netns, "link", "set", "eth0", "up")
            _sh("ip", "-n", netns, "link", "set", "lo", "up")
            _sh("ip", "link", "set", port, "master", bridge, "up")
            hosts[name] = Host(Endpoint(name, netns, f"{subnet}.{number}", bridge_port=port), Counter())
            _start_servers(hosts[name], sockets)
        for src in hosts.values():  # neighbours resolved, so the first measured packets do not wait
            for dst in hosts.values():
                if src is not dst:
                    _echo_rtt(src, dst, timeout=5)
        yield Lab(hosts["a"], hosts["b"], hosts["c"], state_dir)
    finally:
        for host in hosts.values():
            try:
                clear_faults(host.endpoint, state_dir=state_dir)
            except LabError:
                pass  # the namespaces go below, and their rules with them
        for sock in list(sockets):
            sock.close()
        for name in "abc":
            # Deleting the veth deletes both ends now, whatever still holds the namespace.
            subprocess.run(["ip", "link", "del", f"pdtv{pid}{name}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", f"pdt-{pid}-{name}"], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """The lab, with every fault cleared afterwards even when the test fails."""
    yield lab
    for host in (lab.a, lab.b, lab.c):
        clear_faults(host.endpoint, state_dir=lab.state_dir)
    assert active_faults(lab.state_dir) == []


@pytest.fixture
def delayer_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delays go through the NFQUEUE delayer even where the kernel has netem."""
    monkeypatch.setattr(netfaults, "kernel_has_netem", lambda: False)


def _connect(src: Host, dst: Host, port: int, timeout: float) -> socket.socket:
    sock = src.socket()
    sock.settimeout(timeout)
    try:
        sock.connect((dst.ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _echo_rtt(src: Host, dst: Host, timeout: float = 5.0) -> float:
    """Seconds for one byte to go to dst's echo server and come back, on an open connection."""
    with _connect(src, dst, ECHO_PORT, timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.monotonic()
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        return time.monotonic() - start


def _min_rtt(src: Host, dst: Host, samples: int = 3) -> float:
    return min(_echo_rtt(src, dst) for _ in range(samples))


def _reaches(src: Host, dst: Host, timeout: float = 0.5) -> bool:
    try:
        _connect(src, dst, ECHO_PORT, timeout).close()
    except OSError:
        return False
    return True


def _bulk_mbit_per_s(src: Host, dst: Host, size: int = 4 << 20, timeout: float = 20.0) -> float:
    """Send size bytes to dst and wait for its count of what arrived: megabits per second."""
    chunk = b"\0" * (1 << 20)
    with _connect(src, dst, BULK_PORT, timeout) as sock:
        start = time.monotonic()
        for _ in range(size // len(chunk)):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        assert int.from_bytes(sock.recv(8), "big") == size
        return size * 8 / (time.monotonic() - start) / 1e6


def _udp_delivered(src: Host, dst: Host, count: int) -> int:
    tag = os.urandom(16)
    with src.socket(socket.SOCK_DGRAM) as sock:
        for _ in range(count):
            sock.sendto(tag + b"." * 48, (dst.ip, UDP_PORT))
    deadline, last = time.monotonic() + 5, -1
    while dst.udp_received[tag] != last and time.monotonic() < deadline:
        last = dst.udp_received[tag]
        time.sleep(0.2)
    return dst.udp_received[tag]


def _our_delayers() -> list[int]:
    """Live delayer processes this process started."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"pdserve.lab.delayer" in (proc / "cmdline").read_bytes()
                    and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid()):
                pids.append(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


@needs_namespaces
def test_down_partitions_the_pair_and_nothing_else(clean: Lab) -> None:
    a, b, c = clean.a, clean.b, clean.c
    apply_fault(a.endpoint, b.endpoint, LinkFault(down=True), state_dir=clean.state_dir)
    assert not _reaches(a, b) and not _reaches(b, a)
    assert _reaches(c, a) and _reaches(c, b) and _reaches(a, c)
    clear_faults(a.endpoint, b.endpoint, state_dir=clean.state_dir)
    assert _reaches(a, b) and _reaches(b, a)


@needs_namespaces
def test_down_to_everyone_isolates_one_host(clean: Lab) -> None:
    a, b, c = clean.a, clean.b, clean.c
    apply_fault(a.endpoint, None, LinkFault(down=True), state_dir=clean.state_dir)
    assert not _reaches(a, b) and not _reaches(c, a)
    assert _reaches(b, c)
    clear_faults(a.endpoint, state_dir=clean.state_dir)
    assert _reaches(a, b) and _reaches(c, a)


@needs_namespaces
def test_loss_drops_that_share_one_way(clean: Lab) -> None:
    a, b = clean.a, clean.b
    apply_fault(a.endpoint, b.endpoint, LinkFault(loss_pct=30), state_dir=clean.state_dir)
    delivered = _udp_delivered(a, b, 2000)
    assert 0.55 * 2000 <= delivered <= 0.85 * 2000
    clear_faults(a.endpoint, b.endpoint, state_dir=clean.state_dir)
    assert _udp_delivered(a, b, 2000) >= 0.98 * 2000


@needs_namespaces
@pytest.mark.parametrize("backend", ["nfqueue", "netem"])
def test_delay_holds_each_direction(clean: Lab, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "netem" and not netfaults.kernel_has_netem():
        pytest.skip("this kernel has no netem (CONFIG_NET_SCH_NETEM); the nfqueue delayer stands in")
    monkeypatch.setattr(netfaults, "kernel_has_netem", lambda: backend == "netem")
    a, b, c = clean.a, clean.b, clean.c
    apply_fault(a.endpoint, b.endpoint, LinkFault(delay_ms=100), state_dir=clean.state_dir)
    assert _min_rtt(a, b) >= 0.150 and _min_rtt(b, a) >= 0.150
    assert _min_rtt(a, c) < 0.050 and _min_rtt(c, b) < 0.050
    delayers = _our_delayers()
    assert len(delayers) == (1 if backend == "nfqueue" else 0)
    clear_faults(a.endpoint, b.endpoint, state_dir=clean.state_dir)
    assert _min_rtt(a, b) < 0.050
    assert _our_delayers() == [] and not any(Path(f"/proc/{pid}").exists() for pid in delayers)


@needs_namespaces
@pytest.mark.usefixtures("delayer_delays")
def test_a_delayed_stream_still_flows_fast(clean: Lab) -> None:
    # Held in its sender's output hook, a TCP stream behind 5 ms crawled at ~8 Mbit/s (TCP Small
    # Queues counts held packets); held after the veth, it moves ~2 Gbit/s here.
    apply_fault(clean.a.endpoint, clean.b.endpoint, LinkFault(delay_ms=5), state_dir=clean.state_dir)
    assert _bulk_mbit_per_s(clean.a, clean.b, 32 << 20) > 200


@needs_namespaces
def test_jitter_varies_the_delay(clean: Lab) -> None:
    a, b = clean.a, clean.b
    apply_fault(a.endpoint, b.endpoint, LinkFault(delay_ms=40, jitter_ms=30), state_dir=clean.state_dir)
    samples = [_echo_rtt(a, b) for _ in range(6)]
    # Each way is held 10..70 ms, so a round trip takes 20..140 ms, and rarely the same twice.
    assert min(samples) >= 0.015
    assert max(samples) - min(samples) > 0.005


@needs_namespaces
def test_delay_to_everyone(clean: Lab) -> None:
    a, b, c = clean.a, clean.b, clean.c
    apply_fault(a.endpoint, None, LinkFault(delay_ms=100), state_dir=clean.state_dir)
    assert _min_rtt(a, b) >= 0.150 and _min_rtt(c, a) >= 0.150
    assert _min_rtt(b, c) < 0.050


@needs_namespaces
@pytest.mark.usefixtures("delayer_delays")
def test_a_dead_delayer_does_not_heal_the_fault(clean: Lab) -> None:
    a, b = clean.a, clean.b
    apply_fault(a.endpoint, b.endpoint, LinkFault(delay_ms=50), state_dir=clean.state_dir)
    (pid,) = _our_delayers()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _our_delayers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _reaches(a, b)
    assert active_faults(clean.state_dir)[0]["delayer_running"] is False
    clear_faults(a.endpoint, b.endpoint, state_dir=clean.state_dir)
    assert _reaches(a, b)


@needs_namespaces
def test_rate_caps_both_directions_of_the_pair_only(clean: Lab) -> None:
    a, b, c = clean.a, clean.b, clean.c
    assert _bulk_mbit_per_s(a, c) > 150  # uncapped, the veths carry far more
    apply_fault(a.endpoint, b.endpoint, LinkFault(rate="50mbit"), state_dir=clean.state_dir)
    assert _bulk_mbit_per_s(a, b) < 100 and _bulk_mbit_per_s(b, a) < 100
    assert _bulk_mbit_per_s(a, c) > 150 and _bulk_mbit_per_s(c, b) > 150


@needs_namespaces
def test_rate_to_everyone_caps_the_way_in_too(clean: Lab) -> None:
    a, b, c = clean.a, clean.b, clean.c
    apply_fault(a.endpoint, None, LinkFault(rate="50mbit"), state_dir=clean.state_dir)
    assert _bulk_mbit_per_s(a, c) < 100 and _bulk_mbit_per_s(c, a) < 100
    assert _bulk_mbit_per_s(b, c) > 150


@needs_namespaces
@pytest.mark.usefixtures("delayer_delays")
def test_replacing_and_clearing_are_idempotent(clean: Lab) -> None:
    a, b, state_dir = clean.a, clean.b, clean.state_dir
    clear_faults(a.endpoint, b.endpoint, state_dir=state_dir)  # nothing set
    apply_fault(a.endpoint, b.endpoint, LinkFault(delay_ms=100), state_dir=state_dir)
    (first_delayer,) = _our_delayers()
    # The same pair named the other way round replaces the fault.
    apply_fault(b.endpoint, a.endpoint, LinkFault(delay_ms=30), state_dir=state_dir)
    (faults,) = active_faults(state_dir)
    assert (faults["a"], faults["b"], faults["delay_ms"], faults["delay_via"]) == ("b", "a", 30, "nfqueue")
    assert len(_our_delayers()) == 1 and first_delayer not in _our_delayers()
    assert not Path(f"/proc/{first_delayer}").exists()
    assert 0.045 <= _min_rtt(a, b) < 0.150
    apply_fault(b.endpoint, a.endpoint, LinkFault(down=True), state_dir=state_dir)
    assert len(active_faults(state_dir)) == 1 and not _reaches(a, b) and _our_delayers() == []
    apply_fault(a.endpoint, clean.c.endpoint, LinkFault(loss_pct=10), state_dir=state_dir)
    assert sorted((f["a"], f["b"]) for f in active_faults(state_dir)) == [("a", "c"), ("b", "a")]
    for _ in range(2):
        clear_faults(a.endpoint, state_dir=state_dir)
        assert active_faults(state_dir) == []
    assert _reaches(a, b) and _min_rtt(a, b) < 0.050


@needs_namespaces
def test_a_missing_namespace_is_named(clean: Lab) -> None:
    ghost = Endpoint("ghost", f"pdt-{os.getpid()}-ghost", "10.213.255.9")
    with pytest.raises(LabError, match=f"pdt-{os.getpid()}-ghost .*does not exist"):
        apply_fault(clean.a.endpoint, ghost, LinkFault(down=True), state_dir=clean.state_dir)
    assert active_faults(clean.state_dir) == []
