"""Shard layout of the flat per-dtype buffers (hvd_largebatch.distributed.sharding), single process."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hvd_largebatch.distributed.sharding import ShardLayout, flatten_into_buffers, layer_view

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_hand_computed_layout_cuts_through_layers():
    # 77 fp32 elements (layers of 40, 10, 15, 12) and 3 fp16 ones, on 2 ranks
    layout = ShardLayout([40, 10, 3, 15, 12], [torch.float32, torch.float32, torch.float16,
                                                torch.float32, torch.float32], world_size=2)
    fp32, fp16 = layout.buffers
    assert (fp32.dtype, fp32.layers, fp32.offsets, fp32.numel) == (torch.float32, (0, 1, 3, 4),
                                                                   (0, 40, 50, 65), 77)
    assert (fp32.shard_size, fp32.padded_numel) == (39, 78)  # ceil(77 / 2), one padding element
    assert (fp16.layers, fp16.shard_size, fp16.padded_numel) == ((2,), 2, 4)
    as_tuples = lambda rank: [(s.layer, s.buffer, s.start, s.stop, s.offset, s.shard_offset)
                              for s in layout.segments(rank)]
    assert as_tuples(0) == [(0, 0, 0, 39, 0, 0), (2, 1, 0, 2, 0, 0)]
    assert as_tuples(1) == [(0, 0, 39, 40, 39, 0), (1, 0, 40, 50, 0, 1), (3, 0, 50, 65, 0, 11),
                            (4, 0, 65, 77, 0, 26), (2, 1, 2, 3, 2, 0)]


def test_small_buffer_on_many_ranks_leaves_some_ranks_without_segments():
    layout = ShardLayout([2, 3], [torch.float32, torch.float32], world_size=4)
    buf = layout.buffers[0]
    assert (buf.shard_size, buf.padded_numel) == (2, 8)
    # shards [0, 2) [2, 4) [4, 6) [6, 8) of 5 elements: layer 0 | layer 1 | layer 1 | padding
    assert [len(layout.segments(r)) for r in range(4)] == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="rank 4"):
        buf.shard_range(4)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(0, 40), st.sampled_from(DTYPES)), min_size=1,
                      max_size=12),
       world=st.integers(1, 6))
def test_segments_of_all_ranks_cover_every_layer_once(sizes, world):
    numels = [n for n, _ in sizes]
    dtypes = [d for _, d in sizes]
    layout = ShardLayout(numels, dtypes, world)
    assert [b.dtype for b in layout.buffers] == list(dict.fromkeys(dtypes))
    pieces = {i: [] for i in range(len(numels))}
    for rank in range(world):
        for s in layout.segments(rank):
            buf = layout.buffers[s.buffer]
            lo, hi = buf.shard_range(rank)
            assert lo <= s.start < s.stop <= min(hi, buf.numel)
            assert s.shard_offset == s.start - lo
            assert buf.dtype == dtypes[s.layer]
            assert s.offset == s.start - layout.layer_offset[s.layer]
            pieces[s.layer].append((s.offset, s.numel))
    for layer, parts in pieces.items():
        position = 0
        for offset, numel in sorted(parts):
            assert offset == position
            position += numel
        assert position == numels[layer]
    for buf in layout.buffers:
        # equal shards: Horovod's reducescatter splits a multiple of W evenly; padding < W
        assert buf.padded_numel % world == 0
        assert buf.numel <= buf.padded_numel < buf.numel + world or buf.numel == 0


def test_flat_buffers_hold_the_values_and_views_alias_them():
    tensors = [torch.arange(6.0).reshape(2, 3), torch.tensor([7.0, 8.0], dtype=torch.float16),
               torch.tensor([[9.0]])]
    layout = ShardLayout([t.numel() for t in tensors], [t.dtype for t in tensors], world_size=3)
    flats = flatten_into_buffers(tensors, layout, torch.device("cpu"))
    assert [f.numel() for f in flats] == [9, 3]
    assert flats[0].tolist() == [0, 1, 2, 3, 4, 5, 9, 0, 0]
    assert flats[1].tolist() == [7, 8, 0]
    view = layer_view(flats, layout, 2, torch.Size([1, 1]))
    view.fill_(5.0)
    assert flats[0][6] == 5.0
    assert layer_view(flats, layout, 1, torch.Size([2])).dtype == torch.float16


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="world_size"):
        ShardLayout([3], [torch.float32], 0)
    with pytest.raises(ValueError, match="2 sizes for 1 dtypes"):
        ShardLayout([3, 4], [torch.float32], 2)
