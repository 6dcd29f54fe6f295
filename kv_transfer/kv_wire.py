"""KVChunk messages (kv_stream.proto) encoded and decoded by hand, byte for byte as protobuf would.

A chunk is a few MiB of KV. Through the generated class it would be copied four times
(tensor -> bytes -> message -> wire, and back); here the payload is copied once on each
side: from the KV tensor into the wire message, and from the received message into the
KV tensor. tests/test_grpc_kv.py checks the bytes against protobuf's own serializer.
"""
from __future__ import annotations

from dataclasses import dataclass

_VARINT, _LEN = 0, 2
# field numbers of KVChunk in kv_stream.proto
_LAYER, _FIRST, _COUNT, _DATA, _CRC, _NLAYERS, _TOTAL, _BLOCK_BYTES, _SOURCE_PID, _SOURCE_RUNS, _LAYER_COUNT = range(1, 12)


def _varint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _field(out: bytearray, number: int, value: int) -> None:
    if value:  # proto3 leaves zero scalars off the wire
        _varint(out, number << 3 | _VARINT)
        _varint(out, value)


@dataclass
class Chunk:
    layer: int
    first_block: int
    num_blocks: int
    data: memoryview
    crc32c: int
    num_layers: int
    total_blocks: int
    block_bytes: int
    source_pid: int = 0  # same-host reference (data is then empty): the process holding the bytes
    source_runs: tuple[tuple[int, int], ...] = ()  # (address, length) in that process, in order
    layer_count: int = 1  # a reference may span layers layer .. layer + layer_count - 1


def encode_chunk(c: Chunk) -> bytes:
    head = bytearray()
    _field(head, _LAYER, c.layer)
    _field(head, _FIRST, c.first_block)
    _field(head, _COUNT, c.num_blocks)
    if len(c.data):
        _varint(head, _DATA << 3 | _LEN)
        _varint(head, len(c.data))
    tail = bytearray()
    _field(tail, _CRC, c.crc32c)
    _field(tail, _NLAYERS, c.num_layers)
    _field(tail, _TOTAL, c.total_blocks)
    _field(tail, _BLOCK_BYTES, c.block_bytes)
    _field(tail, _SOURCE_PID, c.source_pid)
    if c.source_runs:  # proto3 packs repeated scalars
        packed = bytearray()
        for address, length in c.source_runs:
            _varint(packed, address)
            _varint(packed, length)
        _varint(tail, _SOURCE_RUNS << 3 | _LEN)
        _varint(tail, len(packed))
        tail += packed
    if c.layer_count != 1:
        _field(tail, _LAYER_COUNT, c.layer_count)
    return b"".join((head, c.data, tail))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _read_packed(buf: memoryview, pos: int, stop: int) -> list[int]:
    values = []
    while pos < stop:
        value, pos = _read_varint(buf, pos)
        values.append(value)
    if pos != stop or len(values) % 2:
        raise ValueError("malformed source_runs in a KVChunk")
    return values


def decode_chunk(raw: bytes) -> Chunk:
    """Decodes a KVChunk; ``data`` is a view into ``raw`` (no copy). Unknown fields are skipped."""
    buf = memoryview(raw)
    ints = {}
    runs: list[int] = []
    data = buf[0:0]
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            ints[number], pos = _read_varint(buf, pos)
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated KVChunk")
            if number == _DATA:
                data = buf[pos:pos + size]
            elif number == _SOURCE_RUNS:
                runs.extend(_read_packed(buf, pos, pos + size))
            pos += size
        else:
            raise ValueError(f"unexpected wire type {wire} for field {number} in a KVChunk")
    if pos != end:
        raise ValueError("truncated KVChunk")
    g = ints.get
    return Chunk(g(_LAYER, 0), g(_FIRST, 0), g(_COUNT, 0), data, g(_CRC, 0), g(_NLAYERS, 0), g(_TOTAL, 0),
                 g(_BLOCK_BYTES, 0), g(_SOURCE_PID, 0), tuple(zip(runs[::2], runs[1::2])), g(_LAYER_COUNT, 0) or 1)
