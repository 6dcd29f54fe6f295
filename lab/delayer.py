"""Delays the packets that iptables' NFQUEUE target hands to one queue, for kernels without netem.

Run as `python -m pdserve.lab.delayer --queue N --delay-ms D [--jitter-ms J]` in the network
namespace whose iptables rules queue the packets (the root one, for the lab bridge). The packets
wait in the kernel's queue; this process speaks nfnetlink_queue over a raw netlink socket, reads
only each packet's id (copy mode META: no payload crosses), and sends the ACCEPT verdict once
the packet's delay has passed. Without jitter, packets leave in
order and one batch verdict releases every packet that is due; with jitter, each packet draws
its own delay, uniform in delay +/- jitter, so packets may overtake each other, as with netem.

start_delayer and stop_delayer are the parent's side: netfaults.py starts one per fault.
"""
from __future__ import annotations

import argparse
import collections
import heapq
import math
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from pdserve.lab.errors import LabError

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33  # Linux; the socket module does not name it
SOL_NETLINK = 270
NETLINK_NO_ENOBUFS = 5
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 2
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_FAIL_OPEN = 0x1
NFQA_CFG_F_GSO = 0x4
NF_ACCEPT = 1
NLA_TYPE_MASK = 0x3FFF

PACKET_MESSAGE_TYPE = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
# Packets the kernel holds for this queue before it drops new ones.
QUEUE_MAXLEN = 10_000
# The socket buffer for packet messages: a burst the process is slow to read must not overflow it.
RECEIVE_BUFFER_BYTES = 64 << 20
READY_LINE = b"ready\n"
READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
MODULE = "pdserve.lab.delayer"


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, queue: int, attributes: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    # nfgenmsg: family, version (NFNETLINK_V0), resource id (the queue number, big-endian).
    body = struct.pack("!BBH", socket.AF_UNSPEC, 0, queue) + attributes
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, 0, 0)
    return header + body


def _config_message(queue: int) -> bytes:
    # The kernel applies the attributes in this order: bind, then settle the bound queue.
    flags = NFQA_CFG_F_GSO  # whole GSO packets, not segments: fewer, larger messages
    attributes = b"".join((
        _attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)),
        _attribute(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
        _attribute(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)),
        # Fail-open off: when the queue is full the kernel drops, it never lets packets skip the delay.
        _attribute(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO)),
        _attribute(NFQA_CFG_FLAGS, struct.pack("!I", flags)),
    ))
    return _message(NFQNL_MSG_CONFIG, queue, attributes, NLM_F_REQUEST | NLM_F_ACK)


def _verdict_prefix(msg_type: int, queue: int) -> bytes:
    """A verdict message up to its packet id, which the caller appends (4 bytes, big-endian)."""
    message = _message(msg_type, queue, _attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, 0)))
    return message[:-4]


def _packet_id(buffer: bytearray, start: int, end: int) -> int | None:
    """The packet id from NFQA_PACKET_HDR among the attributes in buffer[start:end]."""
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", buffer, start)
        if length < 4:
            return None
        if kind & NLA_TYPE_MASK == NFQA_PACKET_HDR:
            return struct.unpack_from("!I", buffer, start + 4)[0]
        start += (length + 3) & ~3
    return None


class Delayer:
    """One bound queue and the packets that wait in it for their release time."""

    def __init__(self, queue: int, delay_ms: float, jitter_ms: float) -> None:
        self.delay_s = delay_ms / 1000
        self.jitter_s = jitter_ms / 1000
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER_BYTES)
        # A full buffer drops the packet in the kernel; the socket must not fail because of it.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        self.sock.bind((0, 0))
        self._bind(queue)
        self.verdict = _verdict_prefix(NFQNL_MSG_VERDICT, queue)
        self.verdict_batch = _verdict_prefix(NFQNL_MSG_VERDICT_BATCH, queue)
        self.buffer = bytearray(1 << 16)
        self.in_order: collections.deque[tuple[float, int]] = collections.deque()
        self.jittered: list[tuple[float, int]] = []
        self.highest_id: int | None = None

    def _bind(self, queue: int) -> None:
        self.sock.send(_config_message(queue))
        reply = self.sock.recv(4096)
        _, msg_type = struct.unpack_from("=IH", reply)
        if msg_type == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", reply, 16)
            if error:
                raise OSError(-error, f"binding nfnetlink queue {queue}: {os.strerror(-error)}")

    def receive(self) -> None:
        """Read every packet message waiting on the socket and give each its release time."""
        while True:
            try:
                size = self.sock.recv_into(self.buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            now = time.monotonic()
            offset = 0
            while offset + 16 <= size:
                length, msg_type = struct.unpack_from("=IH", self.buffer, offset)
                if length < 16:
                    break
                if msg_type == PACKET_MESSAGE_TYPE:
                    packet_id = _packet_id(self.buffer, offset + 20, offset + length)
                    if packet_id is not None:
                        self._hold(packet_id, now)
                offset += (length + 3) & ~3

    def _hold(self, packet_id: int, now: float) -> None:
        self.highest_id = packet_id
        if self.jitter_s:
            delay = max(0.0, self.delay_s + random.uniform(-self.jitter_s, self.jitter_s))
            heapq.heappush(self.jittered, (now + delay, packet_id))
        else:
            self.in_order.append((now + self.delay_s, packet_id))

    def release_due(self) -> None:
        now = time.monotonic()
        if self.in_order and self.in_order[0][0] <= now:
            last = 0
            while self.in_order and self.in_order[0][0] <= now:
                last = self.in_order.popleft()[1]
            self.sock.send(self.verdict_batch + last.to_bytes(4, "big"))
        due = []
        while self.jittered and self.jittered[0][0] <= now:
            due.append(self.verdict + heapq.heappop(self.jittered)[1].to_bytes(4, "big"))
        if due:
            # One send carries many verdict messages; the kernel handles each in turn.
            self.sock.send(b"".join(due))

    def release_all(self) -> None:
        """Let every held packet go now (ids are per queue and increasing, so one batch does)."""
        if self.highest_id is not None and (self.in_order or self.jittered):
            self.sock.send(self.verdict_batch + self.highest_id.to_bytes(4, "big"))
        self.in_order.clear()
        self.jittered.clear()

    def seconds_to_next_release(self) -> float | None:
        times = [held[0][0] for held in (self.in_order, self.jittered) if held]
        return max(0.0, min(times) - time.monotonic()) if times else None


def run(queue: int, delay_ms: float, jitter_ms: float) -> None:
    delayer = Delayer(queue, delay_ms, jitter_ms)
    stop_read, stop_write = socket.socketpair()
    stop_write.setblocking(False)
    signal.set_wakeup_fd(stop_write.fileno())
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    sys.stdout.buffer.write(READY_LINE)
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the parent stops reading after the ready line

    poller = select.poll()
    poller.register(delayer.sock, select.POLLIN)
    poller.register(stop_read, select.POLLIN)
    while not stopping:
        wait_s = delayer.seconds_to_next_release()
        poller.poll(None if wait_s is None else math.ceil(wait_s * 1000))
        delayer.receive()
        delayer.release_due()
    # netfaults.py removes the iptables rules before it stops us: what is held can go now.
    delayer.receive()
    delayer.release_all()


def start_delayer(queue: int, delay_ms: float, jitter_ms: float, log_path: Path) -> int:
    """Start a delayer for the queue (in this network namespace); its pid once it is bound."""
    command = [sys.executable, "-m", MODULE, "--queue", str(queue),
               "--delay-ms", str(delay_ms), "--jitter-ms", str(jitter_ms)]
    with open(log_path, "ab") as log:
        # Its own session: the delayer outlives the command that applied the fault.
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=log, start_new_session=True)
    assert process.stdout is not None
    with process.stdout:
        ready, _, _ = select.select([process.stdout], [], [], READY_TIMEOUT_S)
        line = process.stdout.readline() if ready else b""
    if line != READY_LINE:
        process.kill()
        process.wait()
        log_tail = log_path.read_text(errors="replace")[-2000:].strip()
        raise LabError(f"the packet delayer for queue {queue} did not start: {log_tail or 'no output'}")
    _children[process.pid] = process
    return process.pid


# The delayers this process started, so that stopping one also reaps it (no zombie is left).
_children: dict[int, subprocess.Popen[bytes]] = {}


def stop_delayer(pid: int) -> None:
    """Stop a delayer (ours or one another process started) and wait until it is gone."""
    child = _children.pop(pid, None)
    if child is not None:
        child.terminate()
        try:
            child.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return
    signal_to_send: signal.Signals | None = signal.SIGTERM
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while is_delayer(pid):
        if signal_to_send is not None:
            try:
                os.kill(pid, signal_to_send)
            except ProcessLookupError:
                return
            signal_to_send = None
        if time.monotonic() > deadline:
            signal_to_send, deadline = signal.SIGKILL, float("inf")
        time.sleep(0.02)


def is_delayer(pid: int) -> bool:
    """Whether pid is a live delayer process (not a zombie, not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return MODULE.encode() in cmdline and state != "Z"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE queue number (0-65535)")
    parser.add_argument("--delay-ms", type=float, required=True)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    run(args.queue, args.delay_ms, args.jitter_ms)


if __name__ == "__main__":
    main()
