"""The gRPC KV stream in-process: real gRPC server and puller over loopback, KV tensors shaped
like the CPU backend's ([num_blocks, kv_heads, block_size, 2 * head_dim], bf16).

The stream tests run twice: with same-host references (the puller copies the bytes out of the
server's memory; here that is its own process) and with the bytes inline, as across hosts."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdserve.bench.ports import free_port
from pdserve.kv_transfer.faults import FaultSpec, FaultSwitch, write_faults
from pdserve.kv_transfer.kv_layout import BlockLayout, LayoutMismatch
from pdserve.kv_transfer.kv_puller import KVPuller, PullJob, TransferFailed
from pdserve.kv_transfer.kv_server import KVStreamServicer, LeaseTable, start_server

ROOT = Path(__file__).resolve().parents[1]
NUM_BLOCKS = 40
ENGINE = "engine-p"


def _caches(seed: int, layers: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.attn": torch.randn(NUM_BLOCKS, 2, 32, 128, generator=g).to(torch.bfloat16)
            for i in range(layers)}


class Prefill:
    # Reference messages cover at most 3 blocks of one layer (16 KiB each): a 7-block pull is cut
    # within layers, a 1-block pull spans both layers in one message.
    def __init__(self, tmp_path, chunk_bytes=16 << 10, reference_chunk_bytes=48 << 10):
        self.caches = _caches(1)
        self.layout = BlockLayout(self.caches, NUM_BLOCKS)
        self.table = LeaseTable()
        self.fault_file = str(tmp_path / "faults.json")
        self.port = free_port()
        servicer = KVStreamServicer(ENGINE, self.table, self.layout, chunk_bytes, FaultSwitch(self.fault_file),
                                    reference_chunk_bytes=reference_chunk_bytes)
        self.server = start_server(servicer, f"127.0.0.1:{self.port}", 8 << 20, None)

    def lease(self, rid: str, blocks: list[int], seconds: float = 30.0) -> None:
        self.table.add(rid, blocks, time.monotonic() + seconds)

    def job(self, rid: str, local: list[int], first: int = 0, port: int | None = None) -> PullJob:
        return PullJob(request_id="d-" + rid, remote_request_id=rid, remote_engine_id=ENGINE, host="127.0.0.1",
                       port=port or self.port, local_block_ids=local, first_remote_block=first)


@pytest.fixture
def prefill(tmp_path):
    p = Prefill(tmp_path)
    yield p
    p.server.stop(grace=0)


@pytest.fixture(params=["same_host", "inline"])
def decode(request):
    caches = _caches(2)
    return caches, KVPuller(BlockLayout(caches, NUM_BLOCKS), deadline_s=2.0, max_message_bytes=8 << 20, tls=None,
                            same_host_refs=request.param == "same_host")


def _blocks_equal(src, src_ids, dst, dst_ids) -> bool:
    return all(torch.equal(src[name][src_ids], dst[name][dst_ids]) for name in src)


def test_pull_moves_exact_blocks_in_chunks_and_releases_the_lease(prefill, decode):
    caches, puller = decode
    remote = [3, 17, 5, 30, 31, 8, 9]
    prefill.lease("r1", remote)
    local = [0, 1, 2, 20, 21, 22, 39]
    untouched = caches["model.layers.0.attn"][10].clone()
    job = prefill.job("r1", local)
    pulled = puller.pull(job)
    assert pulled.nbytes == len(remote) * 2 * prefill.layout.block_bytes
    assert pulled.same_host == puller.same_host_refs
    assert _blocks_equal(prefill.caches, remote, caches, local)
    assert torch.equal(caches["model.layers.0.attn"][10], untouched)
    assert prefill.table.collect_ended(time.monotonic()) == (set(), 0)  # held until released
    puller.release(job, ok=True)
    assert prefill.table.collect_ended(time.monotonic()) == ({"r1"}, 0)


def test_pull_skips_the_blocks_decode_already_holds(prefill, decode):
    caches, puller = decode
    prefill.lease("r2", [4, 5, 6, 7])
    before = caches["model.layers.1.attn"][0].clone()
    puller.pull(prefill.job("r2", [11, 12], first=2))
    assert _blocks_equal(prefill.caches, [6, 7], caches, [11, 12])
    assert torch.equal(caches["model.layers.1.attn"][0], before)


def test_corrupted_chunk_is_detected(prefill, decode):
    caches, puller = decode
    prefill.lease("r3", [1, 2, 3])
    write_faults(prefill.fault_file, {"corrupt": 1.0})
    job = prefill.job("r3", [5, 6, 7])
    with pytest.raises(TransferFailed) as e:
        puller.pull(job)
    assert e.value.kind == "checksum"
    # The worker then ends the lease with ok=False, so prefill frees the blocks at once.
    puller.release(job, ok=False)
    deadline = time.monotonic() + 3  # the server notices the cancelled stream asynchronously
    while (ended := prefill.table.collect_ended(time.monotonic())) == (set(), 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ended == ({"r3"}, 0)


def test_unreachable_endpoint_fails_fast(decode):
    _, puller = decode
    job = PullJob("d", "r", ENGINE, "127.0.0.1", free_port(), [1], 0)
    start = time.monotonic()
    with pytest.raises(TransferFailed) as e:
        puller.pull(job)
    assert e.value.kind == "unreachable"
    assert time.monotonic() - start < 2.0 + 1.0


def test_slow_transfer_is_cut_at_the_deadline(prefill, decode):
    _, puller = decode
    prefill.lease("r4", [1])
    write_faults(prefill.fault_file, {"delay_s": 5.0})
    start = time.monotonic()
    with pytest.raises(TransferFailed) as e:
        puller.pull(prefill.job("r4", [2]))
    assert e.value.kind == "deadline"
    assert time.monotonic() - start < 2.0 + 1.0


def test_killed_link_refuses_transfers_until_healed(prefill, decode):
    caches, puller = decode
    prefill.lease("r5", [1])
    write_faults(prefill.fault_file, {"kill_links": True})
    with pytest.raises(TransferFailed) as e:
        puller.pull(prefill.job("r5", [2]))
    assert e.value.kind == "unreachable"
    prefill.lease("r6", [1])
    write_faults(prefill.fault_file, None)
    puller.pull(prefill.job("r6", [2]))
    assert _blocks_equal(prefill.caches, [1], caches, [2])


def test_expired_lease_frees_blocks_and_a_later_pull_fails_cleanly(prefill, decode):
    _, puller = decode
    prefill.lease("r7", [1, 2], seconds=0.1)
    time.sleep(0.2)
    done, expired = prefill.table.collect_ended(time.monotonic())
    assert done == {"r7"} and expired == 1
    with pytest.raises(TransferFailed) as e:
        puller.pull(prefill.job("r7", [3, 4]))
    assert e.value.kind == "lease_expired"


def test_unknown_request_and_wrong_engine_are_refused(prefill, decode):
    _, puller = decode
    import pdserve.kv_transfer.kv_server as server

    server_wait = server._LEASE_REGISTRATION_WAIT_S
    server._LEASE_REGISTRATION_WAIT_S = 0.2
    try:
        with pytest.raises(TransferFailed) as e:
            puller.pull(prefill.job("never-leased", [1]))
        assert e.value.kind == "lease_unknown"
    finally:
        server._LEASE_REGISTRATION_WAIT_S = server_wait
    prefill.lease("r8", [1])
    job = prefill.job("r8", [1])
    with pytest.raises(TransferFailed) as e:
        puller.pull(PullJob(job.request_id, "r8", "other-engine", job.host, job.port, [1], 0))
    assert e.value.kind == "engine_mismatch"


def test_a_lease_under_an_active_stream_is_not_reclaimed():
    table = LeaseTable()
    table.add("r", [1], time.monotonic() - 1)
    lease = table.acquire("r", 0.1)
    assert not isinstance(lease, str)
    assert table.collect_ended(time.monotonic()) == (set(), 0)
    table.unpin("r")
    assert table.collect_ended(time.monotonic()) == ({"r"}, 1)


def test_pull_that_registers_late_waits_for_its_lease(prefill, decode):
    import threading

    caches, puller = decode
    threading.Timer(0.3, prefill.lease, args=("late", [9])).start()
    puller.pull(prefill.job("late", [19]))
    assert _blocks_equal(prefill.caches, [9], caches, [19])


def test_layout_mismatch_is_refused():
    small = BlockLayout({"a": torch.zeros(NUM_BLOCKS, 2, 32, 64, dtype=torch.bfloat16)}, NUM_BLOCKS)
    with pytest.raises(LayoutMismatch):
        small.write(0, [1], b"\0" * (small.block_bytes + 2))
    with pytest.raises(ValueError, match="no axis"):
        BlockLayout({"a": torch.zeros(8, 8)}, NUM_BLOCKS)


def test_fault_spec_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown fault keys"):
        FaultSpec.from_dict({"explode": True})
    with pytest.raises(ValueError, match="fraction"):
        FaultSpec.from_dict({"fail": 2})
    switch = FaultSwitch(str(tmp_path / "f.json"))
    assert switch.current().is_empty()
    write_faults(switch.path, {"fail": 0.5})
    assert switch.current().fail == 0.5
    write_faults(switch.path, None)
    assert switch.current().is_empty()


def test_config_validation_of_grpc_settings(tmp_path):
    from pydantic import ValidationError

    from pdserve.settings.cluster import load_config

    base = (ROOT / "configs" / "cpu-pd-grpc.yaml").read_text()
    cases = {
        "chunk_bytes must leave": "    chunk_bytes: 67108864\n",
        "'cert' and 'key' go together": f"    tls: {{cert: {tmp_path}/c.pem, ca: {tmp_path}/c.pem}}\n",
        "file not found": f"    tls: {{cert: {tmp_path}/none.pem, key: {tmp_path}/none.key, ca: {tmp_path}/ca.pem}}\n",
    }
    (tmp_path / "c.pem").write_text("x")
    for message, line in cases.items():
        text = base.replace("    max_message_bytes: 67108864\n", "    max_message_bytes: 67108864\n" + line)
        if "chunk_bytes" in line:
            text = text.replace("    chunk_bytes: 4194304", "")
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ValidationError, match=message):
            load_config(path)


def test_registry_selects_our_connector_for_grpc():
    from pdserve.settings.cluster import load_config
    from pdserve.kv_transfer.grpc_settings import GrpcKVSettings
    from pdserve.kv_transfer.registry import kv_transfer_config_for

    cfg = load_config(ROOT / "configs" / "cpu-pd-grpc.yaml")
    kv = kv_transfer_config_for(cfg, "decode", port=15700, host="10.0.0.2")
    assert kv["kv_connector"] == "GrpcKVConnector" and kv["kv_role"] == "kv_consumer"
    assert kv["kv_connector_module_path"] == "pdserve.kv_transfer.grpc_connector"
    settings = GrpcKVSettings.from_extra(kv["kv_connector_extra_config"])
    assert (settings.host, settings.port, settings.deadline_s) == ("10.0.0.2", 15700, 10.0)


@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX shell")
def test_checked_in_grpc_code_matches_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the 'test' extra")
    out = tmp_path / "pdserve" / "kv_transfer"
    out.mkdir(parents=True)
    shutil.copy(ROOT / "kv_transfer" / "kv_stream.proto", out)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "pdserve/kv_transfer/kv_stream.proto"], cwd=tmp_path, check=True)
    name = "kv_stream_pb2.py"
    assert (out / name).read_text() == (ROOT / "kv_transfer" / name).read_text(), f"{name} is stale: run make proto"


def test_hand_encoded_chunks_are_protobuf_bytes():
    from pdserve.kv_transfer import kv_stream_pb2 as pb
    from pdserve.kv_transfer.kv_wire import Chunk, decode_chunk, encode_chunk

    payload = bytes(range(256)) * 700
    for values in [(0, 0, 3, 0, 2, 3, 1024), (7, 130, 1 << 20, 2**32 - 1, 300, 99999, 2**40)]:
        layer, first, count, crc, nlayers, total, block_bytes = values
        ours = encode_chunk(Chunk(layer, first, count, memoryview(payload), crc, nlayers, total, block_bytes))
        theirs = pb.KVChunk(layer=layer, first_block=first, num_blocks=count, data=payload, crc32c=crc,
                            num_layers=nlayers, total_blocks=total, block_bytes=block_bytes).SerializeToString()
        assert ours == theirs
        back = decode_chunk(theirs)
        assert (back.layer, back.first_block, back.num_blocks, back.crc32c, back.num_layers, back.total_blocks,
                back.block_bytes) == values
        assert bytes(back.data) == payload
    with pytest.raises(ValueError, match="wire type"):
        decode_chunk(theirs + b"\x0f")
    with pytest.raises(ValueError, match="truncated"):
        decode_chunk(theirs[:100])


def _self_signed(tmp_path):
    """A CA and a server certificate for 127.0.0.1, made with the `cryptography` package."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("pdserve test CA")).issuer_name(name("pdserve test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("prefill")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    files = {"ca.pem": ca.public_bytes(pem), "cert.pem": cert.public_bytes(pem),
             "key.pem": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())}
    for fname, data in files.items():
        (tmp_path / fname).write_bytes(data)
    return {k: str(tmp_path / f"{k}.pem") for k in ("ca", "cert", "key")}


def test_pull_over_tls_and_a_plaintext_client_is_refused(tmp_path):
    pytest.importorskip("cryptography")
    from pdserve.kv_transfer.kv_server import TLSFiles

    paths = _self_signed(tmp_path)
    src, dst = _caches(1), _caches(2)
    table = LeaseTable()
    port = free_port()
    server = start_server(KVStreamServicer(ENGINE, table, BlockLayout(src, NUM_BLOCKS), 1 << 20, FaultSwitch(None)),
                          f"127.0.0.1:{port}", 8 << 20, TLSFiles(cert=paths["cert"], key=paths["key"]))
    try:
        table.add("t1", [3, 4], time.monotonic() + 30)
        tls = KVPuller(BlockLayout(dst, NUM_BLOCKS), 2.0, 8 << 20, TLSFiles(ca=paths["ca"]))
        tls.pull(PullJob("d", "t1", ENGINE, "127.0.0.1", port, [7, 8], 0))
        assert _blocks_equal(src, [3, 4], dst, [7, 8])
        plain = KVPuller(BlockLayout(dst, NUM_BLOCKS), 2.0, 8 << 20, None)
        with pytest.raises(TransferFailed):
            plain.pull(PullJob("d", "t1", ENGINE, "127.0.0.1", port, [9, 10], 0))
    finally:
        server.stop(grace=0)


def test_hand_encoded_same_host_references_are_protobuf_bytes():
    from pdserve.kv_transfer import kv_stream_pb2 as pb
    from pdserve.kv_transfer.kv_wire import Chunk, decode_chunk, encode_chunk

    runs = ((0x7F00_0000_1000, 65536), (2**47 + 8, 1), (4096, 3 << 20))
    ours = encode_chunk(Chunk(2, 8, 4, memoryview(b""), 77, 3, 12, 1024, 4242, runs, layer_count=5))
    theirs = pb.KVChunk(layer=2, first_block=8, num_blocks=4, crc32c=77, num_layers=3, total_blocks=12,
                        block_bytes=1024, source_pid=4242, source_runs=[v for run in runs for v in run],
                        layer_count=5).SerializeToString()
    assert ours == theirs
    back = decode_chunk(theirs)
    assert (back.source_pid, back.source_runs, back.layer_count, len(back.data)) == (4242, runs, 5, 0)
    assert decode_chunk(pb.KVChunk(layer=1).SerializeToString()).layer_count == 1  # absent means one layer
    odd = pb.KVChunk(source_runs=[1, 2, 3]).SerializeToString()
    with pytest.raises(ValueError, match="source_runs"):
        decode_chunk(odd)


def test_same_host_copy_lines_up_runs_of_different_cuts():
    import ctypes

    from pdserve.kv_transfer import same_host

    if not same_host.supported():
        pytest.skip("process_vm_readv is not available here")
    src = ctypes.create_string_buffer(bytes(range(256)) * 64, 16384)
    dst = ctypes.create_string_buffer(16384)
    s, d = ctypes.addressof(src), ctypes.addressof(dst)
    # remote: three runs out of order; local: four runs cut elsewhere, same 6,000 bytes in all
    remote = [(s + 8000, 2000), (s, 3000), (s + 12000, 1000)]
    local = [(d, 1500), (d + 4000, 2500), (d + 9000, 1), (d + 10000, 1999)]
    assert same_host.read_into(os.getpid(), local, remote) == 6000
    want = src.raw[8000:10000] + src.raw[0:3000] + src.raw[12000:13000]
    got = dst.raw[0:1500] + dst.raw[4000:6500] + dst.raw[9000:9001] + dst.raw[10000:11999]
    assert got == want
    with pytest.raises(ValueError, match="bytes"):
        same_host.read_into(os.getpid(), local[:1], remote)
    # The same copy in 700-byte steps, each checksummed as it lands, gives the whole range's CRC.
    import crc32c

    ctypes.memset(dst, 0, 16384)
    views = [(d + off, memoryview(dst).cast("B")[off:off + n]) for off, n in [(0, 1500), (4000, 2500), (9000, 1),
                                                                             (10000, 1999)]]
    crc = same_host.read_checked(os.getpid(), views, remote, lambda v, c: crc32c.crc32c(v, c), step=700)
    assert crc == crc32c.crc32c(want)
    assert b"".join(bytes(v) for _, v in views) == want
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(same_host.MemoryRefFailed):
        same_host.read_into(gone.pid, [(d, 16)], [(s, 16)])
    assert not same_host.probe_readable(gone.pid, s, src.raw[:16])
    assert same_host.probe_readable(os.getpid(), s, src.raw[:16])


def test_references_are_asked_for_only_where_the_probe_reads_back(tmp_path, monkeypatch):
    from pdserve.kv_transfer import same_host

    if not same_host.supported():
        pytest.skip("process_vm_readv is not available here")
    p = Prefill(tmp_path)
    try:
        dst = _caches(2)
        # A puller that sees another host (or PID namespace) takes the bytes inline.
        monkeypatch.setattr(same_host, "host_id", lambda: "another-host/pid:[1]")
        other = KVPuller(BlockLayout(dst, NUM_BLOCKS), 2.0, 8 << 20, None)
        p.lease("h1", [1, 2])
        assert other.pull(p.job("h1", [5, 6])).same_host is False
        monkeypatch.undo()
        # Same host, but the probe does not read back (another process behind that pid).
        puller = KVPuller(BlockLayout(dst, NUM_BLOCKS), 2.0, 8 << 20, None)
        monkeypatch.setattr(same_host, "probe_readable", lambda pid, address, expected: False)
        p.lease("h2", [3])
        assert puller.pull(p.job("h2", [7])).same_host is False
        monkeypatch.undo()
        # Once proven, a reference into any other process is refused, and the endpoint is probed again.
        puller = KVPuller(BlockLayout(dst, NUM_BLOCKS), 2.0, 8 << 20, None)
        p.lease("h3", [4])
        assert puller.pull(p.job("h3", [8])).same_host is True
        stub = puller._stub("127.0.0.1", p.port)
        stub.refs_pid = os.getpid() + 1
        p.lease("h4", [9])
        with pytest.raises(TransferFailed) as e:
            puller.pull(p.job("h4", [10]))
        assert e.value.kind == "memory_ref"
        assert stub.refs_pid is None
        p.lease("h5", [11])
        assert puller.pull(p.job("h5", [12])).same_host is True
        assert _blocks_equal(p.caches, [1, 2, 3, 4, 11], dst, [5, 6, 7, 8, 12])
        # The server's own switch, and the chaos fault that forces bytes inline.
        write_faults(p.fault_file, {"force_inline": True})
        p.lease("h6", [13])
        assert puller.pull(p.job("h6", [14])).same_host is False
        write_faults(p.fault_file, None)
        assert _blocks_equal(p.caches, [13], dst, [14])
    finally:
        p.server.stop(grace=0)


def test_drop_kv_params_fault_makes_a_finished_prefill_hand_off_nothing(tmp_path):
    """The chaos switch behind ``pdserve chaos faults --drop-kv-params``: with it on, a finished
    prefill leg frees its blocks at once and returns no kv_transfer_params (the router's
    ``prefill_returned_no_kv_params`` fallback); with it off, the same leg leases its blocks."""
    from types import SimpleNamespace

    from vllm.v1.request import RequestStatus

    from pdserve.kv_transfer.grpc_scheduler import GrpcKVScheduler
    from pdserve.kv_transfer.grpc_settings import GrpcKVSettings

    fault_file = str(tmp_path / "faults.json")
    sched = GrpcKVScheduler("engine-p", GrpcKVSettings(host="10.0.0.1", port=5000, fault_file=fault_file))

    def finished(rid: str):
        req = SimpleNamespace(request_id=rid, kv_transfer_params={"do_remote_decode": True},
                              status=RequestStatus.FINISHED_LENGTH_CAPPED, num_computed_tokens=32)
        return sched.request_finished(req, [3, 4])

    delay, params = finished("r1")
    assert delay and params["remote_block_ids"] == [3, 4] and "r1" in sched._meta.leases
    write_faults(fault_file, {"drop_kv_params": True})
    assert finished("r2") == (False, None) and "r2" not in sched._meta.leases
    write_faults(fault_file, None)
    assert finished("r3")[0]
