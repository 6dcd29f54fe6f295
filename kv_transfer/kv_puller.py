"""The decode side of the gRPC KV stream: pull one request's blocks into local KV blocks.

Every outcome is final and bounded by the per-transfer deadline: the KV is written
and verified, or the pull fails with a named kind. Failed KV is never reported as
loaded; the connector hands failures to vLLM's own failure path.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import crc32c
import grpc

from pdserve.kv_transfer import kv_stream_pb2 as pb
from pdserve.kv_transfer.kv_layout import BlockLayout, LayoutMismatch
from pdserve.kv_transfer.kv_server import PULL_METHOD, RELEASE_METHOD, TLSFiles, channel_options, read_pem
from pdserve.kv_transfer.kv_wire import decode_chunk

_RELEASE_TIMEOUT_S = 1.0


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
                 tls: TLSFiles | None):
        self.layout = layout
        self.deadline_s = deadline_s
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

    def pull(self, job: PullJob) -> int:
        """Pulls and writes the job's blocks; returns bytes moved. Raises TransferFailed.

        The caller ends the remote lease afterwards with ``release`` (it reports the load
        to vLLM first: the release is off the request's critical path).
        """
        return self._pull(self._stub(job.host, job.port), job)

    def _pull(self, stub: "_Stub", job: PullJob) -> int:
        want = len(job.local_block_ids)
        layout = self.layout
        seen = [0] * layout.num_layers
        nbytes = 0
        call = stub.Pull(
            pb.PullRequest(request_id=job.remote_request_id, engine_id=job.remote_engine_id,
                           first_block=job.first_remote_block, num_blocks=want),
            timeout=min(self.deadline_s, job.deadline_s or self.deadline_s), wait_for_ready=False,
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
                if crc32c.crc32c(chunk.data, gil_release_mode=0) != chunk.crc32c:
                    raise TransferFailed("checksum", f"layer {chunk.layer} blocks {chunk.first_block}+{chunk.num_blocks}")
                end = chunk.first_block + chunk.num_blocks
                try:
                    layout.write(chunk.layer, job.local_block_ids[chunk.first_block:end], chunk.data)
                except LayoutMismatch as e:
                    raise TransferFailed("layout", str(e)) from e
                seen[chunk.layer] += chunk.num_blocks
                nbytes += len(chunk.data)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            raise TransferFailed(_STATUS_KIND.get(code, "stream_error"), e.details() if hasattr(e, "details") else str(e)) from None
        except TransferFailed:
            call.cancel()
            raise
        if any(n != want for n in seen):
            raise TransferFailed("stream_cut", f"stream ended after {seen} of {want} blocks per layer")
        return nbytes

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
        self.Pull = channel.unary_stream(PULL_METHOD, request_serializer=pb.PullRequest.SerializeToString,
                                         response_deserializer=None)
        self.Release = channel.unary_unary(RELEASE_METHOD, request_serializer=pb.ReleaseRequest.SerializeToString,
                                           response_deserializer=pb.ReleaseReply.FromString)
