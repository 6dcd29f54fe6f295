"""Same-host references: decode copies a prefill's KV blocks straight out of the prefill process.

Between two processes on one host, UCX (under NIXL) moves KV with one kernel copy
(cross-memory attach, ``process_vm_readv``) rather than through a socket. The gRPC stream
does the same when it can: its chunk messages then say where the bytes lie instead of
carrying them, and the puller copies them into its own KV blocks. The stream keeps every
other duty: the lease, the order, the per-chunk checksum, the deadline and the failures.

A puller takes references from a prefill process only after reading back, from the
address the server named, a random probe the server sent in its Hello. Different hosts,
different PID namespaces (containers, pods), different users or a kernel that forbids
this access all fail the probe, and the stream then carries the bytes inline.
"""
from __future__ import annotations

import ctypes
import functools
import os
import secrets
from typing import Callable, Sequence

# (address, length) in some process's memory
Run = tuple[int, int]

_IOV_MAX = 1024  # the kernel's limit per process_vm_readv call, each side


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _load_readv():
    # PyDLL keeps the GIL across the copy, as kv_layout.write does: in a busy engine
    # process, taking the GIL back after a released call costs a whole switch interval.
    try:
        fn = ctypes.PyDLL(None, use_errno=True).process_vm_readv
    except (AttributeError, OSError):
        return None
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.POINTER(_IOVec), ctypes.c_ulong,
                   ctypes.c_ulong]
    return fn


_readv = _load_readv()


class MemoryRefFailed(OSError):
    """A same-host copy could not be made (the process is gone, or its memory is not readable)."""


def host_id() -> str:
    """Equal for two processes exactly when a PID means the same process to both ("" if unknown)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


@functools.cache
def supported() -> bool:
    """Whether this process can make same-host copies at all: the call exists and is not
    filtered away (a seccomp profile may refuse it even for a process reading itself)."""
    if _readv is None or not host_id():
        return False
    src, dst = ctypes.create_string_buffer(b"pdserve", 8), ctypes.create_string_buffer(8)
    try:
        read_into(os.getpid(), [(ctypes.addressof(dst), 8)], [(ctypes.addressof(src), 8)])
    except MemoryRefFailed:
        return False
    return dst.raw == src.raw


class Probe:
    """Random bytes at a fixed address of this process, for a puller to read back."""

    def __init__(self) -> None:
        self.value = secrets.token_bytes(16)
        self._buf = ctypes.create_string_buffer(self.value, len(self.value))

    @property
    def address(self) -> int:
        return ctypes.addressof(self._buf)


def probe_readable(pid: int, address: int, expected: bytes) -> bool:
    if not supported() or not expected or pid <= 0:
        return False
    out = ctypes.create_string_buffer(len(expected))
    try:
        read_into(pid, [(ctypes.addressof(out), len(expected))], [(address, len(expected))])
    except MemoryRefFailed:
        return False
    return out.raw == expected


def _pieces(local: Sequence[Run], remote: Sequence[Run]):
    """(local address, remote address, length) pieces that line both run lists up byte for byte."""
    li = ri = 0
    l_addr, l_left = local[0] if local else (0, 0)
    r_addr, r_left = remote[0] if remote else (0, 0)
    while li < len(local) and ri < len(remote):
        n = min(l_left, r_left)
        if n:
            yield l_addr, r_addr, n
        l_addr, l_left, r_addr, r_left = l_addr + n, l_left - n, r_addr + n, r_left - n
        if not l_left:
            li += 1
            if li < len(local):
                l_addr, l_left = local[li]
        if not r_left:
            ri += 1
            if ri < len(remote):
                r_addr, r_left = remote[ri]


def _check_sizes(local_bytes: int, remote: Sequence[Run]) -> None:
    remote_bytes = sum(n for _, n in remote)
    if local_bytes != remote_bytes:
        raise ValueError(f"local runs hold {local_bytes} bytes, remote runs {remote_bytes}")


def _read_pieces(pid: int, pieces: Sequence[tuple[int, int, int]]) -> None:
    if _readv is None:
        raise MemoryRefFailed("process_vm_readv is not available on this platform")
    for start in range(0, len(pieces), _IOV_MAX):
        batch = pieces[start:start + _IOV_MAX]
        l_iov = (_IOVec * len(batch))(*[(la, n) for la, _, n in batch])
        r_iov = (_IOVec * len(batch))(*[(ra, n) for _, ra, n in batch])
        want = sum(n for _, _, n in batch)
        got = _readv(pid, l_iov, len(batch), r_iov, len(batch), 0)
        if got != want:
            err = ctypes.get_errno() if got < 0 else 0
            raise MemoryRefFailed(err, f"read {got} of {want} bytes from process {pid}: "
                                       f"{os.strerror(err) if err else 'short read'}")


def read_into(pid: int, local: Sequence[Run], remote: Sequence[Run]) -> int:
    """Copies the bytes of ``remote`` (in process ``pid``) into ``local`` (this process), in order.

    Both lists must cover the same number of bytes. Raises MemoryRefFailed unless every byte arrived.
    """
    total = sum(n for _, n in local)
    _check_sizes(total, remote)
    _read_pieces(pid, list(_pieces(local, remote)))
    return total


def read_checked(pid: int, local: Sequence[tuple[int, memoryview]], remote: Sequence[Run],
                 checksum: Callable[[memoryview, int], int], step: int = 1 << 20) -> int:
    """Copies ``remote`` into the ``local`` (address, view) runs and folds the copied bytes into
    ``checksum(view, value)``, ``step`` bytes at a time, so each piece is checked while it is
    still in cache. Returns the checksum. Raises MemoryRefFailed unless every byte arrived."""
    steps = [(address + off, view[off:off + step]) for address, view in local for off in range(0, len(view), step)]
    _check_sizes(sum(len(view) for _, view in steps), remote)
    # _pieces never lets a piece cross a local run, so each step's pieces add up to the step.
    pieces = _pieces([(address, len(view)) for address, view in steps], remote)
    value = 0
    for _, view in steps:
        batch, need = [], len(view)
        while need:
            piece = next(pieces)
            batch.append(piece)
            need -= piece[2]
        _read_pieces(pid, batch)
        value = checksum(view, value)
    return value
