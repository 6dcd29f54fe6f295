"""The text of the kernel rules that enter network faults: an nft ruleset, an iptables-restore
input and a tc batch, each the whole of what one place should carry.

Pure functions, so each rule set is rendered whole and replaces the previous one; the callers
in netfaults.py run them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# The netdev table in a host's namespace; the one on its bridge port, in the root namespace,
# adds the port's name.
NFT_TABLE = "pdlab"
# Our chain in the root namespace's filter table, jumped to from FORWARD.
QUEUE_CHAIN = "PDLAB-DELAY"
# The handle of the HTB root qdisc we install; any other root qdisc is not ours.
TC_ROOT_HANDLE = "1:"
# An HTB class that only carries a netem delay still needs a rate: one no veth reaches. The
# explicit burst keeps tc from computing a zero one at this rate.
UNLIMITED_CLASS = "rate 100gbit ceil 100gbit burst 4m cburst 4m"
# netem's default limit of 1000 packets would drop a fast stream's packets while they wait.
NETEM_LIMIT = 100_000
# Loss is drawn from 0..9999, so a percentage has two decimals.
LOSS_SCALE = 10_000
# tc's rate units (case-insensitive); a bare number would be bits per second, too easy to misread.
RATE = re.compile(r"(\d+(?:\.\d+)?)(|k|m|g|t|ki|mi|gi|ti)(bit|bps)", re.IGNORECASE)
RATE_PREFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
# A shaped class may send this much at once: a GSO packet (64 KiB), or 1 ms at its rate if more.
# tc's own burst (one timer tick at the rate) is a few KB, which fast classes never reach.
MIN_BURST_BYTES = 64 << 10


@dataclass(frozen=True)
class DropRule:
    """Drop packets to and from a peer (or every packet on the interface)."""

    peer: str | None  # the peer's IPv4 address; None: everyone on the host's interface
    loss_pct: float | None  # None: every packet


@dataclass(frozen=True)
class QueueRule:
    """Hand what the lab bridge forwards from one port (None: any) to another (None: any) to a queue."""

    in_port: str | None
    out_port: str | None
    queue: int


@dataclass(frozen=True)
class ShapedClass:
    """One HTB class on an interface's egress, with an optional netem leaf."""

    peer: str | None  # None: the default class, for every packet no peer class takes
    rate: str | None  # a tc rate; None: unlimited (the class only carries a netem delay)
    delay_ms: float = 0.0
    jitter_ms: float = 0.0


def rate_bits_per_second(rate: str) -> float:
    """The bits per second of a tc rate such as "100mbit" or "1gbps"; ValueError naming `rate`."""
    match = RATE.fullmatch(rate)
    if not match:
        raise ValueError(f"rate {rate!r} is not a tc rate: a number and a unit, like '100mbit' or '10gbit'")
    number, prefix, unit = match.groups()
    bits = float(number) * RATE_PREFIX[prefix.lower()] * (8 if unit.lower() == "bps" else 1)
    if bits <= 0:
        raise ValueError(f"rate {rate!r} must be more than 0")
    return bits


def nft_script(table: str, device: str, address_field: str, rules: Sequence[DropRule]) -> str:
    """An `nft -f` input that replaces a netdev table, atomically, by these rules on the
    device's ingress hook; address_field ("saddr" or "daddr") is the field a peer is matched on.
    """
    # Declaring the table first lets the delete succeed when the table is absent.
    lines = [f"table netdev {table} {{}}", f"delete table netdev {table}"]
    if rules:
        lines += [f"table netdev {table} {{", "  chain ingress {",
                  f'    type filter hook ingress device "{device}" priority -10; policy accept;']
        lines += [f"    {_nft_match(rule, address_field)}drop" for rule in rules]
        lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def _nft_match(rule: DropRule, address_field: str) -> str:
    match = f"ip {address_field} {rule.peer} " if rule.peer else ""
    if rule.loss_pct is not None:
        match += f"numgen random mod {LOSS_SCALE} < {round(rule.loss_pct * LOSS_SCALE / 100)} "
    return match


def iptables_restore_input(rules: Sequence[QueueRule]) -> str:
    """An `iptables-restore --noflush` input that refills our forward chain with these rules.

    Naming a user chain flushes it under --noflush, and the table is replaced in one step.
    Rules naming both ports come first: iptables stops at the first NFQUEUE, so a pair's delay
    takes the place of an everyone-fault's.
    """
    lines = ["*filter", f":{QUEUE_CHAIN} - [0:0]"]
    for rule in sorted(rules, key=lambda r: r.in_port is None or r.out_port is None):
        ports = "".join((f" --physdev-in {rule.in_port}" if rule.in_port else "",
                         f" --physdev-out {rule.out_port}" if rule.out_port else ""))
        lines.append(f"-A {QUEUE_CHAIN} -m physdev --physdev-is-bridged{ports} -j NFQUEUE --queue-num {rule.queue}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def tc_batch(iface: str, classes: Sequence[ShapedClass]) -> str:
    """A `tc -batch` input that builds the interface's HTB root from nothing.

    Peer classes are picked by a u32 filter on the destination address (classification needs
    no tc action, which this kernel lacks); the default class, if any, takes the rest, and
    without one the rest leaves unshaped through HTB's direct queue.
    """
    ordered = sorted(classes, key=lambda c: c.peer is None)
    minors = range(0x10, 0x10 + len(ordered))
    default = next((minor for minor, c in zip(minors, ordered) if c.peer is None), 0)
    lines = [f"qdisc add dev {iface} root handle {TC_ROOT_HANDLE} htb default {default:x}"]
    for minor, shaped in zip(minors, ordered):
        if shaped.rate:
            burst = max(MIN_BURST_BYTES, round(rate_bits_per_second(shaped.rate) / 8 / 1000))
            rate = f"rate {shaped.rate} ceil {shaped.rate} burst {burst}b cburst {burst}b"
        else:
            rate = UNLIMITED_CLASS
        lines.append(f"class add dev {iface} parent 1: classid 1:{minor:x} htb {rate} quantum 60000")
        if shaped.delay_ms:
            lines.append(
                f"qdisc add dev {iface} parent 1:{minor:x} handle {minor:x}: netem"
                f" delay {shaped.delay_ms:g}ms {shaped.jitter_ms:g}ms limit {NETEM_LIMIT}")
        if shaped.peer:
            lines.append(
                f"filter add dev {iface} parent 1: protocol ip prio 1"
                f" u32 match ip dst {shaped.peer}/32 flowid 1:{minor:x}")
    return "\n".join(lines) + "\n"
