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
_LAYER, _FIRST, _COUNT, _DATA, _CRC, _NLAYERS, _TOTAL, _BLOCK_BYTES = range(1, 9)


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


def decode_chunk(raw: bytes) -> Chunk:
    """Decodes a KVChunk; ``data`` is a view into ``raw`` (no copy). Unknown fields are skipped."""
    buf = memoryview(raw)
    ints = {}
    data = buf[0:0]
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            ints[number], pos = _read_varint(buf, pos)
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if number == _DATA:
                data = buf[pos:pos + size]
            pos += size
        else:
            raise ValueError(f"unexpected wire type {wire} for field {number} in a KVChunk")
    if pos != end:
        raise ValueError("truncated KVChunk")
    g = ints.get
    return Chunk(g(_LAYER, 0), g(_FIRST, 0), g(_COUNT, 0), data, g(_CRC, 0), g(_NLAYERS, 0), g(_TOTAL, 0),
                 g(_BLOCK_BYTES, 0))
