"""Real network faults between lab hosts, entered in the kernel.

A fault between hosts a and b acts on both directions of the a<->b path and on nothing else
(a third host still reaches both); with b None it acts between a and everyone. Per field:

- down: nftables drops the path's packets as they arrive somewhere, never as they leave: on the
  ingress of a's interface (what comes from b) and on the ingress of a's bridge port in the
  root namespace (what a sends to b), netdev tables `pdlab` and `pdlab-<port>`; for everyone,
  every frame. A drop in the sender's own output hook comes back to it as an error (EPERM for
  UDP; TCP keeps the segment and sends it again, as if it had never left), not as loss.
- loss_pct: the same places drop that share of packets with `numgen random`, in each
  direction, so a round trip loses 1 - (1 - p)^2, as netem on both ends would. A packet is what
  the stack hands the device: a TCP GSO packet of up to 64 KB is one, as with netem.
- rate: HTB on the egress of a's and of b's interface, one class at the rate, picked by a u32
  filter on the peer's address. For everyone: HTB's default class on a's interface and on its
  bridge port in the root namespace, which is the way into a.
- delay_ms, jitter_ms: netem where the kernel has it, as the leaf of those same HTB classes.
  Otherwise iptables-legacy NFQUEUE rules in the root namespace (br_netfilter passes what the
  lab bridge forwards through FORWARD; physdev picks the ports) and a delayer process there
  (delayer.py) that holds each queued packet for its delay. Packets are held only after they
  crossed a veth: one held in its sender's own output hook still counts against the socket's
  TCP Small Queues budget, which capped a TCP stream at a few Mbit/s behind a 5 ms delay.
  A dead delayer does not heal the fault: the kernel drops what goes to a queue nobody reads.
  A packet is held once: by a pair's delay, else by its sender's or receiver's everyone-fault.

Each fault is a JSON record in state_dir. A change re-renders, whole, the rules of each host it
touches from all the records, so applying again replaces a pair's fault and clearing twice is
clearing once. A pair's rate takes the place of an everyone-fault's for that peer; drops of
both apply.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from pdserve.lab.delayer import is_delayer, start_delayer, stop_delayer
from pdserve.lab.errors import LabError
from pdserve.lab.kernel_rules import (
    NFT_TABLE, QUEUE_CHAIN, TC_ROOT_HANDLE, DropRule, QueueRule, ShapedClass, iptables_restore_input,
    nft_script, rate_bits_per_second, tc_batch)

HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")
NETNS_DIR = Path("/run/netns")
ROOT_INTERFACES = Path("/sys/class/net")  # this process's namespace: the root one
BRIDGE_CALLS_IPTABLES = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
COMMAND_TIMEOUT_S = 30
# The Debian package that brings each command.
PACKAGES = {"ip": "iproute2", "tc": "iproute2", "nft": "nftables", "iptables-legacy": "iptables",
            "iptables-legacy-restore": "iptables"}


@dataclass(frozen=True)
class Endpoint:
    """One lab host as the fault code needs it."""

    name: str  # host name, e.g. "prefill"
    netns: str  # e.g. "pdlab-prefill"
    address: str  # its IPv4 address on the lab bridge, e.g. "10.77.0.3"
    iface: str = "eth0"  # its interface, inside netns
    # The veth end on the bridge, in the root namespace; empty: "pdl-<name>" cut to 15 characters.
    bridge_port: str = ""

    def __post_init__(self) -> None:
        if not HOST_NAME.fullmatch(self.name):
            raise ValueError(f"host name {self.name!r}: use letters, digits, '.', '_' and '-'")
        try:
            ipaddress.IPv4Address(self.address)
        except ValueError:
            raise ValueError(f"address {self.address!r} of host {self.name} is not an IPv4 address") from None
        if not self.bridge_port:
            object.__setattr__(self, "bridge_port", f"pdl-{self.name}"[:15])


@dataclass(frozen=True)
class LinkFault:
    """What to do to the packets of a path; at least one field set."""

    down: bool = False  # drop every packet
    loss_pct: float = 0.0  # drop this share of packets, in each direction
    delay_ms: float = 0.0  # hold each packet this long, in each direction
    jitter_ms: float = 0.0  # each packet's delay is uniform in delay_ms +/- jitter_ms
    rate: str | None = None  # a tc rate, e.g. "100mbit", "10gbit", in each direction

    def __post_init__(self) -> None:
        if not 0 <= self.loss_pct <= 100:
            raise ValueError(f"loss_pct must be between 0 and 100, got {self.loss_pct}")
        if not self.delay_ms >= 0:
            raise ValueError(f"delay_ms must be 0 or more, got {self.delay_ms}")
        if not self.jitter_ms >= 0:
            raise ValueError(f"jitter_ms must be 0 or more, got {self.jitter_ms}")
        if self.jitter_ms and not self.delay_ms:
            raise ValueError("jitter_ms needs delay_ms: jitter varies a delay")
        if self.rate is not None:
            rate_bits_per_second(self.rate)
        shaping = self.loss_pct or self.delay_ms or self.rate is not None
        if self.down and shaping:
            raise ValueError("down drops every packet: loss_pct, delay_ms and rate would have no effect with it")
        if not (self.down or shaping):
            raise ValueError("a LinkFault needs at least one of down, loss_pct, delay_ms, rate")


@dataclass(frozen=True)
class DelayerProcess:
    """A delayer bound to an NFQUEUE queue in the root namespace."""

    queue: int
    pid: int


@dataclass(frozen=True)
class FaultRecord:
    """A fault in force: what was asked, how the delay is entered, and the delayer it runs."""

    a: Endpoint  # the host whose interfaces carry the drop rules
    b: Endpoint | None  # None: between a and everyone
    fault: LinkFault
    delay_via: str | None = None  # "netem", "nfqueue", or None without delay
    delayer: DelayerProcess | None = None

    @property
    def key(self) -> str:
        return record_key(self.a, self.b)

    def involves(self, host: str) -> bool:
        return self.a.name == host or (self.b is not None and self.b.name == host)

    def queue_rules(self) -> list[QueueRule]:
        """The forwarded packets this fault's delayer holds: both ways of its path."""
        if self.delayer is None:
            return []
        queue, port = self.delayer.queue, self.a.bridge_port
        other = self.b.bridge_port if self.b else None
        return [QueueRule(port, other, queue), QueueRule(other, port, queue)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> FaultRecord:
        data = json.loads(text)
        return cls(a=Endpoint(**data["a"]), b=Endpoint(**data["b"]) if data["b"] else None,
                   fault=LinkFault(**data["fault"]), delay_via=data["delay_via"],
                   delayer=DelayerProcess(**data["delayer"]) if data["delayer"] else None)


def record_key(a: Endpoint, b: Endpoint | None) -> str:
    """The record's file stem: one per unordered pair, or per host for an everyone-fault."""
    return f"fault-{a.name}" if b is None else "fault-" + "+".join(sorted((a.name, b.name)))


@dataclass(frozen=True)
class HostRules:
    """What the faults put on one host's interfaces."""

    drops: tuple[DropRule, ...] = ()  # nft, on its interface's and its bridge port's ingress
    egress: tuple[ShapedClass, ...] = ()  # tc on its interface, in its namespace
    bridge_egress: tuple[ShapedClass, ...] = ()  # tc on its bridge port (the way in), root namespace


def host_rules(host: str, records: Iterable[FaultRecord]) -> HostRules:
    drops: list[DropRule] = []
    egress: list[ShapedClass] = []
    bridge_egress: list[ShapedClass] = []
    for record in records:
        fault = record.fault
        netem_delay = fault.delay_ms if record.delay_via == "netem" else 0.0
        shaped = fault.rate is not None or netem_delay
        if record.a.name == host:
            peer = record.b.address if record.b else None
            if fault.down or fault.loss_pct:
                drops.append(DropRule(peer, None if fault.down else fault.loss_pct))
            if shaped:
                egress.append(ShapedClass(peer, fault.rate, netem_delay, fault.jitter_ms))
                if record.b is None:
                    bridge_egress.append(ShapedClass(None, fault.rate, netem_delay, fault.jitter_ms))
        elif record.b is not None and record.b.name == host and shaped:
            egress.append(ShapedClass(record.a.address, fault.rate, netem_delay, fault.jitter_ms))
    return HostRules(tuple(drops), tuple(egress), tuple(bridge_egress))


def apply_fault(a: Endpoint, b: Endpoint | None, fault: LinkFault, *, state_dir: Path) -> None:
    """Put the fault on the a<->b path (b None: between a and everyone), replacing the pair's last."""
    if b is not None and b.name == a.name:
        raise ValueError(f"a fault needs two different hosts, got {a.name} twice")
    _require_root()
    delay_via = None if not fault.delay_ms else ("netem" if kernel_has_netem() else "nfqueue")
    _require_tools(fault, delay_via)
    for host in (a, b):
        if host is not None:
            _require_netns(host)
            _require_bridge_port(host)
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        before = _load_records(state_dir)
        old = before.get(record_key(a, b))
        delayer = _start_delayer(fault, before.values(), state_dir) if delay_via == "nfqueue" else None
        new = FaultRecord(a, b, fault, delay_via, delayer)
        after = {**before, new.key: new}
        # Recorded before the rules go in, so that a crash leaves the delayer findable.
        _record_path(state_dir, new.key).write_text(new.to_json())
        hosts = _hosts_of([new] + ([old] if old else []), given=(a, b))
        try:
            _render(hosts, before.values(), after.values())
        except BaseException:
            _roll_back(hosts, before, after, new, old, state_dir)
            raise
        if old and old.delayer:
            stop_delayer(old.delayer.pid)
            _delayer_log(state_dir, old.delayer.queue).unlink(missing_ok=True)


def clear_faults(a: Endpoint, b: Endpoint | None = None, *, state_dir: Path) -> None:
    """Remove the a<->b fault, or with b None every fault a is part of; nothing set is fine.

    With b None, a's rules are rebuilt from nothing, so what a lost state_dir left is cleared too.
    """
    _require_root()
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        before = _load_records(state_dir)
        if b is None:
            removed = [r for r in before.values() if r.involves(a.name)]
        else:
            removed = [r for r in before.values() if r.key == record_key(a, b)]
        after = {key: r for key, r in before.items() if r not in removed}
        hosts = _hosts_of(removed, given=(a, b))
        # The rules go before the delayers stop: packets must never find a queue nobody reads.
        _render(hosts, before.values(), after.values(), rebuild={a.name} if b is None else set())
        for record in removed:
            if record.delayer:
                stop_delayer(record.delayer.pid)
                _delayer_log(state_dir, record.delayer.queue).unlink(missing_ok=True)
            _record_path(state_dir, record.key).unlink(missing_ok=True)


def active_faults(state_dir: Path) -> list[dict]:
    """The faults in force, for `pdserve lab status`: hosts, fault fields, how the delay is entered."""
    return [
        {"a": r.a.name, "b": r.b.name if r.b else None, **asdict(r.fault), "delay_via": r.delay_via,
         "delayer_pid": r.delayer.pid if r.delayer else None,
         # A dead delayer leaves the path black-holed, not healed: status should show it.
         "delayer_running": is_delayer(r.delayer.pid) if r.delayer else None}
        for r in _load_records(state_dir).values()
    ]


@functools.cache
def kernel_has_netem() -> bool:
    """Whether the kernel has the netem qdisc: tried on the loopback of a throwaway namespace."""
    if shutil.which("unshare") is None or shutil.which("tc") is None:
        return False
    probe = subprocess.run(["unshare", "--net", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                           capture_output=True, timeout=COMMAND_TIMEOUT_S)
    return probe.returncode == 0


def _start_delayer(fault: LinkFault, records: Iterable[FaultRecord], state_dir: Path) -> DelayerProcess:
    # A replaced fault's delayer keeps its queue until the new rules are in.
    taken = {r.delayer.queue for r in records if r.delayer}
    queue = next(q for q in range(1, 65536) if q not in taken)
    pid = start_delayer(queue, fault.delay_ms, fault.jitter_ms, _delayer_log(state_dir, queue))
    return DelayerProcess(queue, pid)


def _delayer_log(state_dir: Path, queue: int) -> Path:
    return state_dir / f"delayer-{queue}.log"


def _roll_back(hosts: dict[str, Endpoint], before: dict[str, FaultRecord], after: dict[str, FaultRecord],
               new: FaultRecord, old: FaultRecord | None, state_dir: Path) -> None:
    """Best effort back to `before` after a failed apply; the caller raises the first error."""
    with contextlib.suppress(Exception):
        _render(hosts, after.values(), before.values())
    if new.delayer:
        stop_delayer(new.delayer.pid)
    path = _record_path(state_dir, new.key)
    if old:
        path.write_text(old.to_json())
    else:
        path.unlink(missing_ok=True)


def _hosts_of(records: Iterable[FaultRecord], given: tuple[Endpoint, Endpoint | None]) -> dict[str, Endpoint]:
    """The hosts the records touch, by name; the endpoints the caller passed win over recorded ones."""
    hosts: dict[str, Endpoint] = {}
    for record in records:
        for host in (record.a, record.b):
            if host is not None:
                hosts[host.name] = host
    for host in given:
        if host is not None:
            hosts[host.name] = host
    return hosts


def _render(hosts: dict[str, Endpoint], before: Iterable[FaultRecord], after: Iterable[FaultRecord],
            rebuild: set[str] = frozenset()) -> None:
    """Bring the hosts' rules, and the root namespace's delay rules, from `before` to `after`.

    Only the kinds of rules that change are rewritten (a tc root rebuilt drops what waits in
    it); hosts in `rebuild` get every kind rewritten.
    """
    before, after = list(before), list(after)
    queues_before = [rule for r in before for rule in r.queue_rules()]
    queues_after = [rule for r in after for rule in r.queue_rules()]
    if rebuild or queues_before != queues_after:
        _render_queues(queues_after)
    for name, host in hosts.items():
        old, new = host_rules(name, before), host_rules(name, after)
        everything = name in rebuild
        # A namespace that is gone took its rules along; the root namespace's are still there.
        in_netns = _netns_exists(host.netns)
        if not in_netns and (new.drops or new.egress):
            _require_netns(host)
        if everything or old.drops != new.drops:
            _render_drops(host, new.drops, in_netns)
        if in_netns and (everything or old.egress != new.egress):
            _render_shaping(host.netns, host.iface, new.egress)
        if everything or old.bridge_egress != new.bridge_egress:
            _render_shaping(None, host.bridge_port, new.bridge_egress)


def _render_drops(host: Endpoint, rules: tuple[DropRule, ...], in_netns: bool) -> None:
    if not rules and shutil.which("nft") is None:
        return  # without nft nothing of ours can be there
    if in_netns:  # what comes to the host
        _run(["nft", "-f", "-"], netns=host.netns, stdin=nft_script(NFT_TABLE, host.iface, "saddr", rules))
    # What the host sends, as it enters the bridge.
    bridge_table = f"{NFT_TABLE}-{host.bridge_port}"
    _run(["nft", "-f", "-"], stdin=nft_script(bridge_table, host.bridge_port, "daddr", rules))


def _render_queues(rules: list[QueueRule]) -> None:
    if not rules and shutil.which("iptables-legacy") is None:
        return
    current = _run(["iptables-legacy", "-w", "-S"]).stdout.splitlines()
    jump = f"-A FORWARD -j {QUEUE_CHAIN}"
    if rules:
        _run(["iptables-legacy-restore", "-w", "--noflush"], stdin=iptables_restore_input(rules))
        if jump not in current:
            _run(["iptables-legacy", "-w", "-I", "FORWARD", "1", "-j", QUEUE_CHAIN])
        return
    for _ in range(current.count(jump)):
        _run(["iptables-legacy", "-w", "-D", "FORWARD", "-j", QUEUE_CHAIN])
    if f"-N {QUEUE_CHAIN}" in current:
        _run(["iptables-legacy", "-w", "-F", QUEUE_CHAIN])
        _run(["iptables-legacy", "-w", "-X", QUEUE_CHAIN])


def _render_shaping(netns: str | None, iface: str, classes: tuple[ShapedClass, ...]) -> None:
    if not classes and shutil.which("tc") is None:
        return
    shown = _run(["tc", "qdisc", "show", "dev", iface, "root"], netns=netns, check=False)
    if shown.returncode:
        if classes:
            raise LabError(f"cannot shape {iface}{_where(netns)}: {shown.stderr.strip()}")
        return  # no such interface: nothing of ours on it
    if shown.stdout.startswith(f"qdisc htb {TC_ROOT_HANDLE} "):
        _run(["tc", "qdisc", "del", "dev", iface, "root"], netns=netns)
    if classes:
        _run(["tc", "-batch", "-"], netns=netns, stdin=tc_batch(iface, classes))


def _run(argv: list[str], *, netns: str | None = None, stdin: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command (inside netns when given); LabError with its stderr when it fails."""
    command = ["ip", "netns", "exec", netns, *argv] if netns else argv
    try:
        result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}{_where(netns)} took over {COMMAND_TIMEOUT_S} s") from None
    if check and result.returncode:
        raise LabError(f"{' '.join(argv)}{_where(netns)} failed: {result.stderr.strip()}")
    return result


def _where(netns: str | None) -> str:
    return f" in network namespace {netns}" if netns else ""


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("network faults change kernel rules in the lab's namespaces: run as root")


def _require_tools(fault: LinkFault, delay_via: str | None) -> None:
    needed = ["ip"]
    if fault.down or fault.loss_pct:
        needed.append("nft")
    if fault.rate is not None or delay_via == "netem":
        needed.append("tc")
    if delay_via == "nfqueue":
        needed += ["iptables-legacy", "iptables-legacy-restore"]
    for command in needed:
        if shutil.which(command) is None:
            raise LabError(f"{command} is not installed: install the Debian package {PACKAGES[command]}"
                           " (make setup does)")
    if delay_via == "nfqueue" and not _bridge_calls_iptables():
        raise LabError(
            "a delay without netem is held as the lab bridge forwards it, which needs br_netfilter:"
            " run `modprobe br_netfilter && sysctl -w net.bridge.bridge-nf-call-iptables=1`")


def _bridge_calls_iptables() -> bool:
    try:
        return BRIDGE_CALLS_IPTABLES.read_text().strip() == "1"
    except FileNotFoundError:
        return False


def _netns_exists(netns: str) -> bool:
    return (NETNS_DIR / netns).exists()


def _require_netns(host: Endpoint) -> None:
    if not _netns_exists(host.netns):
        raise LabError(f"network namespace {host.netns} of host {host.name} does not exist:"
                       " start the lab's hosts first")


def _require_bridge_port(host: Endpoint) -> None:
    if not (ROOT_INTERFACES / host.bridge_port).exists():
        raise LabError(f"bridge port {host.bridge_port} of host {host.name} does not exist in the root"
                       " namespace: start the lab's hosts first, or name the port in its Endpoint")


def _record_path(state_dir: Path, key: str) -> Path:
    return state_dir / f"{key}.json"


def _load_records(state_dir: Path) -> dict[str, FaultRecord]:
    records = (FaultRecord.from_json(path.read_text()) for path in sorted(state_dir.glob("fault-*.json")))
    return {record.key: record for record in records}


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One change at a time: two commands racing would each render from stale records."""
    with open(state_dir / ".faults.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
