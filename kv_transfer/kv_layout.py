"""How one engine's paged KV cache is cut into per-layer block runs and put back.

vLLM hands the connector one tensor per attention layer. Whatever the backend's
layout, one axis indexes blocks; a block of a layer is everything along the other
axes. Both ends of a transfer must agree on the bytes of one block of one layer,
which the stream checks before writing anything.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from math import prod

import torch


class LayoutMismatch(RuntimeError):
    """The remote engine's blocks do not have this engine's shape."""


@dataclass(frozen=True)
class _Layer:
    name: str
    cache: torch.Tensor
    block_dim: int


class BlockLayout:
    def __init__(self, kv_caches: dict[str, torch.Tensor], num_blocks: int):
        if not kv_caches:
            raise ValueError("no KV cache tensors were registered")
        self.layers: list[_Layer] = []
        for name in sorted(kv_caches):
            cache = kv_caches[name]
            dims = [d for d, size in enumerate(cache.shape) if size == num_blocks]
            if not dims:
                raise ValueError(
                    f"KV cache {name!r} of shape {tuple(cache.shape)} has no axis of "
                    f"{num_blocks} blocks; this layout is not supported by the gRPC transport"
                )
            self.layers.append(_Layer(name, cache, dims[0]))
        first = self.layers[0].cache
        self.block_shape = tuple(s for d, s in enumerate(first.shape) if d != self.layers[0].block_dim)
        self.dtype = first.dtype
        self.block_bytes = prod(self.block_shape) * first.element_size()
        for layer in self.layers:
            shape = tuple(s for d, s in enumerate(layer.cache.shape) if d != layer.block_dim)
            if shape != self.block_shape or layer.cache.dtype != self.dtype:
                raise ValueError(f"KV cache {layer.name!r} differs in shape or dtype from the others")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def addressable(self) -> bool:
        """Whether every block of every layer is one run of host memory (what same-host references need)."""
        return all(e.block_dim == 0 and e.cache.device.type == "cpu" and e.cache.is_contiguous()
                   for e in self.layers)

    def runs(self, layer: int, block_ids: list[int]) -> list[tuple[int, memoryview]]:
        """The blocks as (address, view) runs of this process's memory, in the given order;
        consecutive block ids share one run. Only for an ``addressable`` layout."""
        entry = self.layers[layer]
        flat = entry.cache.view(torch.uint8).reshape(-1).numpy()
        base, size = entry.cache.data_ptr(), self.block_bytes
        out: list[tuple[int, memoryview]] = []
        i = 0
        while i < len(block_ids):
            j = i + 1
            while j < len(block_ids) and block_ids[j] == block_ids[j - 1] + 1:
                j += 1
            first = block_ids[i] * size
            out.append((base + first, memoryview(flat[first:first + (j - i) * size])))
            i = j
        return out

    def read(self, layer: int, block_ids: list[int]) -> memoryview:
        """The bytes of ``block_ids`` of one layer, blocks in the given order.

        For consecutive blocks this is a view into the KV cache itself (no copy): use it
        before the blocks can change, i.e. while their lease holds them.
        """
        entry = self.layers[layer]
        run = self._run(entry, block_ids)
        if run is not None:
            blocks = run  # a view: the one copy is tobytes() below
        else:
            idx = torch.tensor(block_ids, dtype=torch.long)
            blocks = entry.cache.index_select(entry.block_dim, idx)
            if entry.block_dim != 0:
                blocks = blocks.movedim(entry.block_dim, 0)
        return memoryview(blocks.contiguous().view(torch.uint8).reshape(-1).numpy())

    @staticmethod
    def _run(entry: _Layer, block_ids: list[int]) -> torch.Tensor | None:
        """The blocks as one contiguous view, when they are consecutive (the common case)."""
        if entry.block_dim != 0 or not block_ids:
            return None
        first = block_ids[0]
        if block_ids[-1] - first + 1 != len(block_ids) or block_ids != list(range(first, first + len(block_ids))):
            return None
        view = entry.cache[first:first + len(block_ids)]
        return view if view.is_contiguous() else None

    def write(self, layer: int, block_ids: list[int], data: bytes | memoryview) -> None:
        """Writes ``data`` (as produced by ``read`` on an identical layout) into ``block_ids``."""
        if len(data) != self.block_bytes * len(block_ids):
            raise LayoutMismatch(
                f"layer {layer}: got {len(data)} bytes for {len(block_ids)} blocks of "
                f"{self.block_bytes} bytes"
            )
        entry = self.layers[layer]
        with warnings.catch_warnings():
            # The source is only read; torch warns because ``bytes`` is immutable.
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.frombuffer(data, dtype=torch.uint8)
        src = raw.view(self.dtype).view(len(block_ids), *self.block_shape)
        run = self._run(entry, block_ids)
        if run is not None:
            # A memoryview copy keeps the GIL: torch's copy_ would drop it, and in a busy
            # engine process getting it back costs a whole switch interval.
            memoryview(run.view(torch.uint8).reshape(-1).numpy())[:] = data
            return
        if entry.block_dim != 0:
            src = src.movedim(0, entry.block_dim)
        idx = torch.tensor(block_ids, dtype=torch.long)
        entry.cache.index_copy_(entry.block_dim, idx, src)

    def chunks(self, num_blocks: int, max_chunk_bytes: int) -> list[tuple[int, int]]:
        """(first, count) runs over ``num_blocks`` blocks, each at most ``max_chunk_bytes`` of one layer."""
        per_chunk = max(1, max_chunk_bytes // max(1, self.block_bytes))
        return [(first, min(per_chunk, num_blocks - first)) for first in range(0, num_blocks, per_chunk)]
