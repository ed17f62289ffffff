"""Split-K decode attention with the combine fused into the split kernel (the last split of a
(sequence, KV head) to finish reduces, engine/kernels/decode_attention.py) against the
two-kernel path: the same bits, both within tolerance of the torch backend, the arrival
counters back at zero after every launch and every CUDA-graph replay, NaN carried through."""

from __future__ import annotations

import weakref

import pytest
import torch

from engine.attention.metadata import AttentionMetadata, SeqGroup
from engine.kernels.decode_attention import _COUNTERS, _SplitCounters, decode_attention
from tests.kernels.helpers import assert_close, paged_batch, reference_attention
from tests.kernels.test_fp8_kv import _fp8_layer

pytestmark = pytest.mark.gpu

# (query heads, kv heads, head_dim): GQA groups of 1, 3 (head_dim 80: padded to 128), 4 and 7
# (a group that is not a power of two reduces with masked rows)
HEADS = [(4, 4, 32), (6, 2, 80), (8, 2, 64), (7, 1, 128)]
SPLITS = 4


def _block_n(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 64  # the kernel's tile of keys


def _active_splits(ctx_len: int, block_n: int, num_splits: int) -> int:
    """Splits that get tiles, computed as the kernel cuts the context."""
    num_tiles = -(-ctx_len // block_n)
    per_split = -(-num_tiles // num_splits)
    return max(1, -(-num_tiles // max(per_split, 1)))


def _contexts(block_n: int) -> list[int]:
    """One token, on and after a block (16) and a tile boundary, and contexts that leave 1,
    some and all of SPLITS splits with tiles."""
    lens = [1, 16, 17, block_n, block_n + 1, 3 * block_n - 5, 4 * block_n, 5 * block_n + 3]
    active = {_active_splits(c, block_n, SPLITS) for c in lens}
    assert {1, SPLITS} <= active and len(active) >= 3, active
    return lens


def _counters_clean(like: torch.Tensor) -> bool:
    """The shared counters of `like`'s device exist and are all zero."""
    counters = _COUNTERS._by_device.get(like.device)
    return counters is not None and not counters.any()


def _both_paths(q, kv_layer, group, num_splits=SPLITS):
    """(fused output, two-kernel output), each over a NaN-filled output buffer."""
    outs = []
    for fused in (True, False):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, kv_layer, group, q.shape[-1] ** -0.5, out, num_splits=num_splits,
                         fused_combine=fused)
        outs.append(out)
    return outs


def _case(device, dtype, heads, lens):
    hq, hkv, d = heads
    batch = paged_batch([1] * len(lens), lens, hkv, d, 16, dtype, device)
    q = torch.randn(len(lens), hq, d, device=device).to(dtype)
    meta = AttentionMetadata(batch.slot_mapping, len(lens), batch.group, None)
    return batch, q, meta


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
def test_fused_combine_equals_two_kernels_and_reference(device, dtype, heads):
    batch, q, meta = _case(device, dtype, heads, _contexts(_block_n(dtype)))
    fused, two = _both_paths(q, batch.kv_layer, batch.group)
    assert torch.equal(fused, two), "fused combine differs from the combine kernel"
    assert _counters_clean(q)
    ref = reference_attention(q, batch.kv_clean, meta, heads[2] ** -0.5)
    assert_close(fused, ref, dtype, f"fused {heads}")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_split_active_at_batch_one_and_few(device, batch_size):
    """Contexts where every one of 8 splits has tiles, at batch 1 and 3 (Llama's GQA 4)."""
    lens = [8 * 64 - 7 * b for b in range(batch_size)]  # 8 tiles of 64 each
    assert all(_active_splits(c, 64, 8) == 8 for c in lens)
    batch, q, meta = _case(device, torch.float16, (8, 2, 64), lens)
    fused, two = _both_paths(q, batch.kv_layer, batch.group, num_splits=8)
    assert torch.equal(fused, two)
    assert _counters_clean(q)
    assert_close(fused, reference_attention(q, batch.kv_clean, meta, 64 ** -0.5),
                 torch.float16, "all splits")


def test_fused_combine_over_fp8_cache(device):
    dtype, heads = torch.float16, (8, 2, 64)
    batch, q, meta = _case(device, dtype, heads, _contexts(_block_n(dtype)))
    layer = _fp8_layer(batch.kv_layer, batch.kv_clean)
    fused, two = _both_paths(q, layer, batch.group)
    assert torch.equal(fused, two)
    assert _counters_clean(q)
    from engine.kv_cache.fp8 import dequantize_rows, quantize_rows

    clean = dequantize_rows(quantize_rows(batch.kv_clean.float()), torch.float32)
    assert_close(fused, reference_attention(q, clean, meta, heads[2] ** -0.5), dtype, "fp8")


def test_repeated_launches_with_changing_contexts(device):
    """The counters one launch leaves are the next launch's start: lengths change between
    calls (fewer and more active splits) and every result still equals the two-kernel one."""
    dtype, heads = torch.float16, (8, 2, 64)
    batch, q, _ = _case(device, dtype, heads, [300, 300, 300])
    for lens in ([300, 1, 65], [1, 1, 1], [200, 300, 17], [300, 300, 300]):
        group = SeqGroup(batch.group.block_tables, torch.tensor(lens, dtype=torch.int32,
                         device=device), batch.group.query_start, 1, max(lens))
        fused, two = _both_paths(q, batch.kv_layer, group)
        assert torch.equal(fused, two), lens
        assert _counters_clean(q), lens


def test_nan_in_a_key_reaches_its_heads_only(device):
    """A NaN key inside sequence 0's context (in its second split) makes the output of the
    query heads of that KV head NaN, on both paths; everything else stays equal and finite."""
    dtype, heads = torch.float16, (8, 2, 64)
    batch, q, _ = _case(device, dtype, heads, [200, 200])
    kv_head, token = 1, 70  # tile 1 of 4: split 1
    block = batch.group.block_tables[0, token // 16].long()
    batch.kv_layer[block, 0, token % 16, kv_head, 3] = float("nan")
    fused, two = _both_paths(q, batch.kv_layer, batch.group)
    torch.testing.assert_close(fused, two, rtol=0, atol=0, equal_nan=True)
    group = heads[0] // heads[1]
    poisoned = torch.zeros_like(fused, dtype=torch.bool)
    poisoned[0, kv_head * group:(kv_head + 1) * group] = True
    assert torch.isnan(fused[poisoned]).all()
    assert not torch.isnan(fused[~poisoned]).any()
    assert _counters_clean(q)


def test_counters_allocated_once_and_kept_when_grown(device):
    """Zeroed once per device; growing (an explicit num_splits past the default's rows) keeps
    the old buffer alive, since a graph captured before may still point at it."""
    counters = _SplitCounters()
    dev = torch.device(device)
    small = counters.get(dev, 8)
    assert small.numel() >= 8 and not small.any()
    assert counters.get(dev, 8) is small  # allocated once, not per launch
    alive = weakref.ref(small)
    num_small = small.numel()
    del small
    big = counters.get(dev, num_small + 1)
    assert big.numel() > num_small and not big.any()
    assert alive() is not None


@pytest.mark.parametrize("batch_size", [1, 8])
def test_llama_shape_matches_on_gpu(cuda, batch_size):
    """Llama-3-8B's heads in bf16 with the splits the engine picks (32 at batch 1), then 50
    launches over random lengths: on a GPU the splits run concurrently, so a reduction that
    started before the last partial landed would show up as a difference. (The interpreter
    runs programs one after another and cannot show that race.)"""
    lens = [8191, 1, 63, 64, 65, 1000, 2049, 4096][:batch_size]
    batch, q, meta = _case("cuda", torch.bfloat16, (32, 8, 128), lens)
    fused, two = _both_paths(q, batch.kv_layer, batch.group, num_splits=None)
    assert torch.equal(fused, two)
    assert _counters_clean(q)
    assert_close(fused, reference_attention(q, batch.kv_clean, meta, 128 ** -0.5),
                 torch.bfloat16, "llama shape")
    ctx = batch.group.context_lens
    longest = ctx.clone()  # each table's size
    for _ in range(50):
        ctx.copy_(torch.minimum(torch.randint_like(ctx, 1, 8192), longest))
        fused, two = _both_paths(q, batch.kv_layer, batch.group, num_splits=None)
        assert torch.equal(fused, two), ctx.tolist()
    assert _counters_clean(q)


def test_graph_replays_with_changing_contexts(cuda):
    """Captured once (with PDL on Hopper), replayed over new context lengths: each replay equals
    an eager two-kernel launch, and the counters are clean after every replay."""
    heads, lens_max = (32, 8, 128), [4096, 300, 1024]
    batch, q, _ = _case("cuda", torch.bfloat16, heads, lens_max)
    ctx = batch.group.context_lens.clone()
    group = SeqGroup(batch.group.block_tables, ctx, batch.group.query_start, 1, max(lens_max))
    out = torch.empty_like(q)
    decode_attention(q, batch.kv_layer, group, 128 ** -0.5, out, fused_combine=True)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, batch.kv_layer, group, 128 ** -0.5, out, fused_combine=True)
    for lens in ([4096, 300, 1024], [1, 1, 1], [65, 299, 1000], [4000, 17, 1], [4096, 300, 1024]):
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        for _ in range(3):
            out.fill_(float("nan"))
            graph.replay()
        torch.cuda.synchronize()
        _, two = _both_paths(q, batch.kv_layer, group, num_splits=None)
        assert torch.equal(out, two), lens
        assert _counters_clean(q), lens
