"""Flat-buffer shard layout for sharded optimizer state, and the segment arithmetic on it.

The trainable parameters (in ``param_groups`` order; *layer* ``i`` is the i-th of them) are laid
out back to back in one flat buffer per dtype, in order of first appearance. For a buffer of ``n``
elements on ``W`` ranks:

* shard size ``s = ceil(n / W)``; the buffer is padded with zeros to ``W * s`` elements;
* rank ``r`` owns the elements ``[r * s, (r + 1) * s)``; the padding (``n`` .. ``W * s``) lives at
  the end, in the last rank's shard (and in earlier ones when ``n < (W - 1) * s``; a rank may then
  own no element at all).

Padding to a multiple of ``W`` makes ``hvd.reducescatter`` of the padded buffer split it into
equal, contiguous shards on every rank (Horovod 0.28.1 gives the first ranks one more row when the
first dimension does not divide), and makes ``hvd.allgather`` of the shards rebuild the buffer.

A shard may cut through layers. The part of a layer inside one rank's shard is a
:class:`Segment`; per-layer sums (``||w||^2``, ``||g||^2``, ``<w, g>``) are the sums of the
layer's segments over all ranks. Nothing here imports Horovod.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class FlatBuffer:
    """One dtype's flat buffer: which layers it holds, where, and how it is cut into shards.

    ``layers``: global layer indices in buffer order; ``offsets``: start of each of them in the
    buffer (elements); ``numels``: their sizes; ``numel``: ``n``, the elements that belong to
    layers; ``shard_size``: ``s``; ``world_size``: ``W``.
    """

    dtype: torch.dtype
    layers: tuple[int, ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]
    numel: int
    shard_size: int
    world_size: int

    @property
    def padded_numel(self) -> int:
        """``W * s``: the allocated length, a multiple of the world size."""
        return self.shard_size * self.world_size

    def shard_range(self, rank: int) -> tuple[int, int]:
        """``[start, stop)`` of ``rank``'s shard in the padded buffer (always ``s`` elements)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of {self.world_size}")
        return rank * self.shard_size, (rank + 1) * self.shard_size


@dataclass(frozen=True)
class Segment:
    """The part of layer ``layer`` inside one rank's shard of buffer ``buffer``.

    ``start`` / ``stop``: positions in the flat buffer; ``offset``: position of ``start`` inside
    the layer (elements, row-major); ``shard_offset``: position of ``start`` inside the shard.
    """

    layer: int
    buffer: int
    start: int
    stop: int
    offset: int
    shard_offset: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


class ShardLayout:
    """Where every layer lives in the per-dtype flat buffers, for ``world_size`` ranks.

    ``numels`` / ``dtypes``: one entry per layer (trainable parameter), in order. Layers of zero
    elements get a place (and no segment).
    """

    def __init__(self, numels: Sequence[int], dtypes: Sequence[torch.dtype], world_size: int):
        if len(numels) != len(dtypes):
            raise ValueError(f"{len(numels)} sizes for {len(dtypes)} dtypes")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1 (got {world_size})")
        self.world_size = world_size
        self.num_layers = len(numels)
        order: list[torch.dtype] = list(dict.fromkeys(dtypes))
        members = {dt: [i for i, d in enumerate(dtypes) if d == dt] for dt in order}
        self.buffers: list[FlatBuffer] = []
        self.layer_buffer = [0] * self.num_layers
        self.layer_offset = [0] * self.num_layers
        self.layer_numel = [int(n) for n in numels]
        for b, dt in enumerate(order):
            layers = members[dt]
            sizes = [int(numels[i]) for i in layers]
            if any(n < 0 for n in sizes):
                raise ValueError("layer sizes must be >= 0")
            offsets, total = [], 0
            for i, n in zip(layers, sizes):
                offsets.append(total)
                self.layer_buffer[i] = b
                self.layer_offset[i] = total
                total += n
            shard = max(1, -(-total // world_size))
            self.buffers.append(FlatBuffer(dt, tuple(layers), tuple(offsets), tuple(sizes), total,
                                           shard, world_size))

    def segments(self, rank: int) -> list[Segment]:
        """``rank``'s segments, buffer by buffer, in layer order; their union over all ranks is
        every element of every layer exactly once."""
        out = []
        for b, buf in enumerate(self.buffers):
            lo, hi = buf.shard_range(rank)
            hi = min(hi, buf.numel)
            if lo >= hi:
                continue
            first = bisect.bisect_right(buf.offsets, lo) - 1
            for j in range(max(first, 0), len(buf.layers)):
                start, size = buf.offsets[j], buf.numels[j]
                if start >= hi:
                    break
                a, z = max(start, lo), min(start + size, hi)
                if a < z:
                    out.append(Segment(buf.layers[j], b, a, z, a - start, a - lo))
        return out

    def describe(self) -> dict:
        """A plain description (sizes, dtypes, world size) that identifies the layout."""
        return {"world_size": self.world_size,
                "buffers": [{"dtype": str(b.dtype), "layers": list(b.layers),
                             "numels": list(b.numels)} for b in self.buffers]}


def flatten_into_buffers(tensors: Sequence[torch.Tensor], layout: ShardLayout,
                         device: torch.device) -> list[torch.Tensor]:
    """New zero-padded flat buffers (one per dtype) holding copies of ``tensors``' values."""
    flats = [torch.zeros(b.padded_numel, dtype=b.dtype, device=device) for b in layout.buffers]
    for i, t in enumerate(tensors):
        view = layer_view(flats, layout, i, t.shape)
        view.copy_(t.detach())
    return flats


def layer_view(flats: Sequence[torch.Tensor], layout: ShardLayout, layer: int,
               shape: torch.Size) -> torch.Tensor:
    """Layer ``layer``'s place in the flat buffers, as a contiguous view of ``shape``."""
    start = layout.layer_offset[layer]
    return flats[layout.layer_buffer[layer]][start:start + layout.layer_numel[layer]].view(shape)
