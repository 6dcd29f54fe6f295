"""The decode side of the gRPC KV stream: pull one request's blocks into local KV blocks.

Every outcome is final and bounded by the per-transfer deadline: the KV is written
and verified, or the pull fails with a named kind. Failed KV is never reported as
loaded; the connector hands failures to vLLM's own failure path.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import crc32c
import grpc

from pdserve.kv_transfer import kv_stream_pb2 as pb
from pdserve.kv_transfer import same_host
from pdserve.kv_transfer.kv_layout import BlockLayout, LayoutMismatch
from pdserve.kv_transfer.kv_server import (HELLO_METHOD, PULL_METHOD, RELEASE_METHOD, TLSFiles, channel_options,
                                           read_pem)
from pdserve.kv_transfer.kv_wire import Chunk, decode_chunk

_RELEASE_TIMEOUT_S = 1.0
_HELLO_TIMEOUT_S = 1.0


def _crc32c(data: memoryview, value: int) -> int:
    return crc32c.crc32c(data, value, gil_release_mode=0)  # keeps the GIL: see kv_layout.write


class TransferFailed(RuntimeError):
    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class PullJob:
    request_id: str          # this engine's request id
    remote_request_id: str
    remote_engine_id: str
    host: str
    port: int
    local_block_ids: list[int]
    first_remote_block: int  # blocks before this are a local prefix-cache hit
    deadline_s: float | None = None  # this request's own deadline (its TTFT budget), if tighter


@dataclass(frozen=True)
class Pulled:
    nbytes: int
    same_host: bool  # the bytes came by same-host reference, not inline in the stream


_STATUS_KIND = {
    grpc.StatusCode.UNAVAILABLE: "unreachable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.NOT_FOUND: "lease_unknown",
    grpc.StatusCode.FAILED_PRECONDITION: "lease_expired",
    grpc.StatusCode.CANCELLED: "stream_cut",
    grpc.StatusCode.INVALID_ARGUMENT: "engine_mismatch",
}


class KVPuller:
    def __init__(self, layout: BlockLayout, deadline_s: float, max_message_bytes: int,
                 tls: TLSFiles | None, same_host_refs: bool = True):
        self.layout = layout
        self.deadline_s = deadline_s
        # Ask for same-host references where a Hello proves they work (same_host.py).
        self.same_host_refs = same_host_refs and layout.addressable and same_host.supported()
        self._options = channel_options(max_message_bytes)
        self._creds = grpc.ssl_channel_credentials(read_pem(tls.ca)) if tls and tls.ca else None
        self._stubs: dict[tuple[str, int], _Stub] = {}
        self._lock = threading.Lock()

    def _stub(self, host: str, port: int) -> "_Stub":
        key = (host, port)
        with self._lock:
            stub = self._stubs.get(key)
            if stub is None:
                target = f"{host}:{port}"
                channel = (grpc.secure_channel(target, self._creds, options=self._options) if self._creds
                           else grpc.insecure_channel(target, options=self._options))
                stub = self._stubs[key] = _Stub(channel)
        return stub

    def pull(self, job: PullJob) -> Pulled:
        """Pulls and writes the job's blocks. Raises TransferFailed.

        The caller ends the remote lease afterwards with ``release`` (it reports the load
        to vLLM first: the release is off the request's critical path).
        """
        end = time.monotonic() + min(self.deadline_s, job.deadline_s or self.deadline_s)
        stub = self._stub(job.host, job.port)
        refs_pid = self._refs_pid(stub, end) if self.same_host_refs else 0
        return self._pull(stub, job, refs_pid, end)

    def _refs_pid(self, stub: "_Stub", end: float) -> int:
        """The prefill process whose memory this puller proved it can read, or 0. Asked once per endpoint."""
        if stub.refs_pid is not None:
            return stub.refs_pid
        try:
            hello = stub.Hello(pb.HelloRequest(), timeout=max(0.01, min(_HELLO_TIMEOUT_S, end - time.monotonic())))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # a server that predates Hello
                stub.refs_pid = 0
            return 0  # otherwise not remembered: the pull reports what is wrong with the endpoint
        ok = (hello.memory_refs and hello.host_id == same_host.host_id()
              and same_host.probe_readable(hello.pid, hello.probe_address, hello.probe))
        stub.refs_pid = hello.pid if ok else 0
        return stub.refs_pid

    def _pull(self, stub: "_Stub", job: PullJob, refs_pid: int, end: float) -> Pulled:
        want = len(job.local_block_ids)
        layout = self.layout
        seen = [0] * layout.num_layers
        nbytes = 0
        by_reference = False
        call = stub.Pull(
            pb.PullRequest(request_id=job.remote_request_id, engine_id=job.remote_engine_id,
                           first_block=job.first_remote_block, num_blocks=want, memory_refs=refs_pid > 0),
            timeout=max(0.01, end - time.monotonic()), wait_for_ready=False,
        )
        try:
            for raw in call:
                chunk = decode_chunk(raw)
                if chunk.num_layers != layout.num_layers or chunk.block_bytes != layout.block_bytes:
                    raise TransferFailed("layout", (
                        f"remote has {chunk.num_layers} layers x {chunk.block_bytes} B blocks, "
                        f"local {layout.num_layers} x {layout.block_bytes} B"))
                if chunk.total_blocks != want:
                    raise TransferFailed("layout", f"remote holds {chunk.total_blocks} blocks, local expects {want}")
                local = job.local_block_ids[chunk.first_block:chunk.first_block + chunk.num_blocks]
                if chunk.source_runs:
                    nbytes += self._copy_reference(stub, chunk, local, refs_pid)
                    by_reference = True
                    for layer in range(chunk.layer + 1, chunk.layer + chunk.layer_count):
                        seen[layer] += chunk.num_blocks
                else:
                    if crc32c.crc32c(chunk.data, gil_release_mode=0) != chunk.crc32c:
                        raise TransferFailed("checksum", f"layer {chunk.layer} blocks {chunk.first_block}+{chunk.num_blocks}")
                    try:
                        layout.write(chunk.layer, local, chunk.data)
                    except LayoutMismatch as e:
                        raise TransferFailed("layout", str(e)) from e
                    nbytes += len(chunk.data)
                seen[chunk.layer] += chunk.num_blocks
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            raise TransferFailed(_STATUS_KIND.get(code, "stream_error"), e.details() if hasattr(e, "details") else str(e)) from None
        except TransferFailed:
            call.cancel()
            raise
        if any(n != want for n in seen):
            raise TransferFailed("stream_cut", f"stream ended after {seen} of {want} blocks per layer")
        # A pull of no blocks moved nothing either way: it counts as the mode that was agreed.
        return Pulled(nbytes, by_reference if nbytes else refs_pid > 0)

    def _copy_reference(self, stub: "_Stub", chunk: Chunk, local: list[int], refs_pid: int) -> int:
        """Copies one same-host chunk into ``local`` blocks and checks it. Bytes that fail the
        checksum stay in blocks that vLLM is then told failed to load, and recomputes."""
        where = f"layer {chunk.layer}+{chunk.layer_count} blocks {chunk.first_block}+{chunk.num_blocks}"
        if not refs_pid or chunk.source_pid != refs_pid:
            stub.refs_pid = None  # e.g. the prefill restarted behind this endpoint: prove it again
            raise TransferFailed("memory_ref", f"{where}: unasked reference into process {chunk.source_pid}")
        layers = range(chunk.layer, chunk.layer + chunk.layer_count)
        expect = len(local) * self.layout.block_bytes * len(layers)
        if (len(local) != chunk.num_blocks or layers.stop > self.layout.num_layers
                or sum(n for _, n in chunk.source_runs) != expect):
            raise TransferFailed("layout", f"{where}: the reference does not cover {len(local)} local blocks "
                                           f"of {len(layers)} layer(s)")
        runs = [run for layer in layers for run in self.layout.runs(layer, local)]
        try:
            crc = same_host.read_checked(chunk.source_pid, runs, chunk.source_runs, _crc32c)
        except same_host.MemoryRefFailed as e:
            stub.refs_pid = None
            raise TransferFailed("memory_ref", f"{where}: {e}") from None
        if crc != chunk.crc32c:
            raise TransferFailed("checksum", where)
        return expect

    def release(self, job: PullJob, ok: bool) -> None:
        """Ends the remote lease. Best effort: a prefill that misses it frees the blocks on lease expiry."""
        request = pb.ReleaseRequest(request_id=job.remote_request_id, engine_id=job.remote_engine_id, ok=ok)
        try:
            self._stub(job.host, job.port).Release(request, timeout=_RELEASE_TIMEOUT_S)
        except grpc.RpcError:
            pass

    def close(self) -> None:
        with self._lock:
            for stub in self._stubs.values():
                stub.channel.close()
            self._stubs.clear()


class _Stub:
    """Client of service KVStream; Pull hands back raw KVChunk bytes for kv_wire to decode."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.refs_pid: int | None = None  # None: not asked yet; 0: no same-host references here
        self.Hello = channel.unary_unary(HELLO_METHOD, request_serializer=pb.HelloRequest.SerializeToString,
                                         response_deserializer=pb.HelloReply.FromString)
        self.Pull = channel.unary_stream(PULL_METHOD, request_serializer=pb.PullRequest.SerializeToString,
                                         response_deserializer=None)
        self.Release = channel.unary_unary(RELEASE_METHOD, request_serializer=pb.ReleaseRequest.SerializeToString,
                                           response_deserializer=pb.ReleaseReply.FromString)
