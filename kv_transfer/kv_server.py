"""The prefill side of the gRPC KV stream: leases on finished requests and the server that streams them.

The server runs in the prefill engine's worker process (it reads the engine's own
KV tensors) and starts and stops with the connector. A lease ends three ways:
decode releases it, it expires, or the engine shuts down. Either way the blocks go
back to vLLM through ``get_finished`` on the next engine step.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field

import crc32c
import grpc

from pdserve.kv_transfer import kv_stream_pb2 as pb
from pdserve.kv_transfer import same_host
from pdserve.kv_transfer.faults import FaultSwitch
from pdserve.kv_transfer.kv_layout import BlockLayout
from pdserve.kv_transfer.kv_wire import Chunk, encode_chunk

logger = logging.getLogger(__name__)

# A pull can arrive before the engine step that registers its lease; wait this long for it.
_LEASE_REGISTRATION_WAIT_S = 5.0
_EXPIRED_MEMORY = 4096
# Bytes one same-host reference message covers at most. A reference is a few bytes whatever it
# covers, so this only sets the pipelining: the checksum of one overlaps the copy of the one before.
_REFERENCE_CHUNK_BYTES = 16 << 20


@dataclass
class Lease:
    block_ids: list[int]
    expires_at: float  # time.monotonic(), shared by the engine's processes on one host
    active_streams: int = 0
    released: bool = False


@dataclass
class LeaseTable:
    """Requests whose blocks are held for a remote decode, and those whose hold has ended."""

    leases: dict[str, Lease] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)
    expired: "OrderedDict[str, None]" = field(default_factory=OrderedDict)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, request_id: str, block_ids: list[int], expires_at: float) -> None:
        with self.cond:
            self.leases[request_id] = Lease(list(block_ids), expires_at)
            self.cond.notify_all()

    def acquire(self, request_id: str, wait_s: float) -> Lease | str:
        """Pins the lease for one stream, or says why it can't ("expired" / "unknown")."""
        deadline = time.monotonic() + wait_s
        with self.cond:
            while True:
                lease = self.leases.get(request_id)
                if lease is not None and not lease.released:
                    lease.active_streams += 1
                    return lease
                if request_id in self.expired:
                    return "expired"
                if lease is not None and lease.released:
                    return "released"
                left = deadline - time.monotonic()
                if left <= 0:
                    return "unknown"
                self.cond.wait(left)

    def unpin(self, request_id: str) -> None:
        with self.cond:
            lease = self.leases.get(request_id)
            if lease is not None:
                lease.active_streams -= 1
                self.cond.notify_all()

    def wait_for_a_stream_to_end(self, timeout_s: float) -> None:
        """Returns when a stream ends, or after ``timeout_s``; at once when none is streaming."""
        with self.cond:
            if any(lease.active_streams for lease in self.leases.values()):
                self.cond.wait(timeout_s)

    def release(self, request_id: str) -> bool:
        with self.cond:
            lease = self.leases.get(request_id)
            if lease is None or lease.released:
                return False
            lease.released = True
            return True

    def collect_ended(self, now: float) -> tuple[set[str], int]:
        """Ids whose blocks may be freed now, and how many of them expired unpulled.

        A lease with a stream still reading is never reclaimed: freeing blocks under a
        reader would send another request's KV with valid checksums.
        """
        done: set[str] = set()
        expired = 0
        with self.cond:
            for rid, lease in list(self.leases.items()):
                if lease.active_streams > 0:
                    continue
                if lease.released:
                    done.add(rid)
                elif now >= lease.expires_at:
                    done.add(rid)
                    expired += 1
                    self.expired[rid] = None
                    while len(self.expired) > _EXPIRED_MEMORY:
                        self.expired.popitem(last=False)
            for rid in done:
                del self.leases[rid]
        return done, expired

    def drop_all(self) -> set[str]:
        with self.cond:
            ids = set(self.leases)
            self.leases.clear()
            return ids


SERVICE = pb.DESCRIPTOR.services_by_name["KVStream"].full_name
PULL_METHOD = f"/{SERVICE}/Pull"
RELEASE_METHOD = f"/{SERVICE}/Release"
HELLO_METHOD = f"/{SERVICE}/Hello"


class KVStreamServicer:
    """Implements service KVStream of kv_stream.proto; Pull yields KVChunk messages already encoded."""

    def __init__(self, engine_id: str, table: LeaseTable, layout: BlockLayout,
                 chunk_bytes: int, faults: FaultSwitch, memory_refs: bool = True,
                 reference_chunk_bytes: int = _REFERENCE_CHUNK_BYTES):
        self.engine_id = engine_id
        self.table = table
        self.layout = layout
        self.chunk_bytes = chunk_bytes
        self.faults = faults
        # Same-host references (same_host.py): offered when allowed and this cache can be addressed.
        self.memory_refs = memory_refs and layout.addressable and same_host.supported()
        self.reference_chunk_bytes = reference_chunk_bytes
        self._probe = same_host.Probe()
        self._host_id = same_host.host_id()

    def Hello(self, request: pb.HelloRequest, context) -> pb.HelloReply:
        return pb.HelloReply(engine_id=self.engine_id, host_id=self._host_id, pid=os.getpid(),
                             probe_address=self._probe.address, probe=self._probe.value,
                             memory_refs=self.memory_refs)

    def Pull(self, request: pb.PullRequest, context: grpc.ServicerContext):
        if request.engine_id != self.engine_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"engine id mismatch: this is {self.engine_id}, asked for {request.engine_id}")
        fault = self.faults.current()
        if fault.kill_links or self.faults.roll(fault.fail):
            context.abort(grpc.StatusCode.UNAVAILABLE, "KV link down (injected fault)")
        got = self.table.acquire(request.request_id, _LEASE_REGISTRATION_WAIT_S)
        if isinstance(got, str):
            code = grpc.StatusCode.NOT_FOUND if got == "unknown" else grpc.StatusCode.FAILED_PRECONDITION
            context.abort(code, f"no KV lease for request {request.request_id!r}: {got}")
        try:
            yield from self._stream(got, request, context, fault)
        finally:
            self.table.unpin(request.request_id)

    def _stream(self, lease: Lease, request: pb.PullRequest, context, fault):
        first = request.first_block
        wanted = lease.block_ids[first:first + request.num_blocks] if request.num_blocks else lease.block_ids[first:]
        if fault.delay_s and self.faults.roll(fault.delay_fraction):
            # Stalls like a slow link, but ends with the call: a puller that gave up at its
            # deadline must not keep the lease pinned for the rest of the stall.
            until = time.monotonic() + fault.delay_s
            while context.is_active() and time.monotonic() < until:
                time.sleep(0.05)
        corrupt = self.faults.roll(fault.corrupt)
        if request.memory_refs and self.memory_refs and not fault.force_inline:
            yield from self._references(wanted, context, corrupt)
            return
        layout = self.layout
        for layer in range(layout.num_layers):
            for start, count in layout.chunks(len(wanted), self.chunk_bytes):
                if not context.is_active():
                    return
                data = layout.read(layer, wanted[start:start + count])
                crc = crc32c.crc32c(data, gil_release_mode=0)  # see kv_layout.write
                if corrupt:
                    data = memoryview(bytes([data[0] ^ 0xFF]) + data[1:])
                    corrupt = False
                yield encode_chunk(Chunk(layer, start, count, data, crc, layout.num_layers, len(wanted),
                                         layout.block_bytes))

    def _references(self, wanted: list[int], context, corrupt: bool):
        """Same-host chunks: each names where its bytes lie in this process, so one message can
        cover several layers (fewer messages, the same pipelining of checksum and copy)."""
        layout = self.layout
        if not wanted:
            return
        budget = self.reference_chunk_bytes
        layer_bytes = len(wanted) * layout.block_bytes
        if layer_bytes <= budget:
            per = budget // layer_bytes
            units = [(layer, min(per, layout.num_layers - layer), 0, len(wanted))
                     for layer in range(0, layout.num_layers, per)]
        else:
            units = [(layer, 1, start, count) for layer in range(layout.num_layers)
                     for start, count in layout.chunks(len(wanted), budget)]
        for layer, layer_count, start, count in units:
            if not context.is_active():
                return
            yield self._reference(layer, layer_count, wanted[start:start + count], start, len(wanted), corrupt)
            corrupt = False

    def _reference(self, layer: int, layer_count: int, blocks: list[int], start: int, total: int,
                   corrupt: bool) -> bytes:
        """One reference chunk; its checksum is of the bytes as they are now.

        Decode reads them after this message arrives, while the lease still holds the blocks;
        should they change in between (a lease that expired mid-read), the checksum fails.
        """
        layout = self.layout
        runs = [run for l in range(layer, layer + layer_count) for run in layout.runs(l, blocks)]
        crc = 0
        for _, view in runs:
            crc = crc32c.crc32c(view, crc, gil_release_mode=0)
        if corrupt:  # the injected fault: what decode reads no longer matches the checksum
            crc ^= 0xFFFFFFFF
        return encode_chunk(Chunk(layer, start, len(blocks), memoryview(b""), crc, layout.num_layers, total,
                                  layout.block_bytes, os.getpid(),
                                  tuple((address, len(view)) for address, view in runs), layer_count))

    def Release(self, request: pb.ReleaseRequest, context):
        if not request.ok:
            logger.warning("decode rejected the KV of %s; it recomputes", request.request_id)
        return pb.ReleaseReply(was_leased=self.table.release(request.request_id))


@dataclass(frozen=True)
class TLSFiles:
    cert: str | None = None   # PEM certificate of this endpoint (server side)
    key: str | None = None    # its private key
    ca: str | None = None     # CA that signed the peer (client side: the server's CA)


def read_pem(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    # Not grpc.http2.max_frame_size: 16 MiB frames gained 10 % on a bare loopback stream but
    # cost P/D chat traffic ~40 % TTFT and TPOT here (measured with bench/pd_vs_mono).
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def start_server(servicer: KVStreamServicer, bind: str, max_message_bytes: int,
                 tls: TLSFiles | None, workers: int = 8) -> grpc.Server:
    options = channel_options(max_message_bytes) + [("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kv-stream"),
                         options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, request_deserializer=pb.PullRequest.FromString, response_serializer=bytes),
        "Release": grpc.unary_unary_rpc_method_handler(
            servicer.Release, request_deserializer=pb.ReleaseRequest.FromString,
            response_serializer=pb.ReleaseReply.SerializeToString),
        "Hello": grpc.unary_unary_rpc_method_handler(
            servicer.Hello, request_deserializer=pb.HelloRequest.FromString,
            response_serializer=pb.HelloReply.SerializeToString),
    }),))
    if tls and tls.cert and tls.key:
        creds = grpc.ssl_server_credentials([(read_pem(tls.key), read_pem(tls.cert))])
        port = server.add_secure_port(bind, creds)
    else:
        port = server.add_insecure_port(bind)
    if port == 0:
        raise RuntimeError(f"gRPC KV server could not bind {bind} (port in use?)")
    server.start()
    return server
