"""The decode-sized MoE experts path (engine/kernels/moe_gemv.py: two GEMV-style launches)
against the torch reference `fused_experts_ref` in float32, and `fused_experts`' choice between
it and the grouped GEMMs (engine/kernels/fused_moe.py).

In Triton's interpreter on small shapes, bf16 included (the GEMV kernels use no `tl.dot`, whose
interpreted bf16 is what test_fused_moe.py cannot check on the CPU; the grouped path's cases
here skip bf16 on the CPU as that file does); natively on CUDA at real decode sizes, with
NaN-poisoned fresh buffers and replay of a captured CUDA graph (PDL launches) under new routing.
Setup (weights, routing, the fp32 oracle) is test_fused_moe.py's."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.helpers import assert_close
from tests.kernels.test_fused_moe import _experts, _reference, _routing, _skip_unsupported

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp16 shares bf16's code path (16-bit loads, fp32 accumulation): in `make test` (the interpreter
# on CPU) its cases run with `make test-slow`; on a GPU every dtype runs
DTYPES_CI = [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow), torch.bfloat16]


def _ep_map(num_experts: int, held: list[int], device) -> torch.Tensor:
    """Global expert id -> local index for the experts this rank holds, -1 elsewhere."""
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32, device=device)
    expert_map[held] = torch.arange(len(held), dtype=torch.int32, device=device)
    return expert_map


def _interpreter_tiles():
    """Tiles for the interpreter: half the programs of the defaults (it runs them one by one)
    and several K strips at these small sizes, so that every test walks across strip and slot
    boundaries (the defaults' 256-wide strips cover hidden 64 / intermediate 48 in one)."""
    from engine.kernels.moe_gemv import GemvTile, MoEGemvConfig

    return MoEGemvConfig(GemvTile(16, 32), GemvTile(16, 32))


def moe_case(device, dtype, num_tokens, num_experts, top_k, hidden, inter, hot, expert_map):
    """Random inputs, all experts' weights, this rank's (`expert_map`: the held ones) and a
    routing: (x, w13, w2, local13, local2, weights, ids)."""
    w13, w2 = _experts(num_experts, hidden, inter, dtype, device)
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, device, hot)
    local13, local2 = w13, w2
    if expert_map is not None:
        held = (expert_map >= 0).nonzero().flatten()
        local13, local2 = w13[held].contiguous(), w2[held].contiguous()
    return x, w13, w2, local13, local2, weights, ids


def _check_gemv(device, dtype, num_tokens, num_experts, top_k, hidden=64, inter=48, hot=None,
                config=None, expert_map=None):
    """The GEMV path (forced) equals the oracle; returns (out, inputs). Without `config`: the
    interpreter's tiles on the CPU, the production lookup (`get_config`) on CUDA."""
    from engine.kernels.moe_gemv import moe_gemv_experts

    x, w13, w2, local13, local2, weights, ids = moe_case(
        device, dtype, num_tokens, num_experts, top_k, hidden, inter, hot, expert_map)
    if config is None and device == "cpu":
        config = _interpreter_tiles()
    out = moe_gemv_experts(x, local13, local2, weights, ids, expert_map, config)
    assert out.shape == x.shape and out.dtype == dtype
    what = f"T={num_tokens} E={num_experts} k={top_k} H={hidden} I={inter}"
    assert_close(out, _reference(x, w13, w2, weights, ids, expert_map), dtype, what)
    return out, (x, weights, ids)


@pytest.mark.parametrize("dtype", DTYPES_CI, ids=str)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [
    (1, 8, 1), (3, 8, 2), (1, 128, 8), (8, 128, 8), (5, 16, 8), (32, 8, 2), (64, 8, 1)])
def test_decode_batches(device, dtype, num_tokens, num_experts, top_k):
    """Top-k 1/2/8, 1 token up to the threshold's 64 pairs, 8..128 experts (most idle)."""
    _check_gemv(device, dtype, num_tokens, num_experts, top_k)


@pytest.mark.parametrize("dtype", DTYPES_CI, ids=str)
@pytest.mark.parametrize("hidden,inter", [(72, 40), (66, 36), (40, 72)])
def test_ragged_tiles(device, dtype, hidden, inter):
    """Sizes that are no multiple of the tiles: partial N tiles and partial K strips in both
    kernels (tiles of 16 x 32), and the default tiles."""
    from engine.kernels.moe_gemv import DEFAULT_CONFIG, GemvTile, MoEGemvConfig

    small = MoEGemvConfig(GemvTile(16, 32), GemvTile(16, 32, num_warps=2))
    for config in (small, DEFAULT_CONFIG):
        _check_gemv(device, dtype, 6, 8, 2, hidden, inter, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_experts_without_tokens(device, dtype):
    """Only 3 of 32 experts receive tokens."""
    _check_gemv(device, dtype, 24, 32, 2, hidden=72, inter=40, hot=3)


@pytest.mark.parametrize("dtype", DTYPES_CI, ids=str)
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_expert_map_drops_other_ranks_experts(device, dtype, top_k):
    """Rank holding global experts {1, 4, 6, 7} of 8: the other experts' pairs add zero, and a
    token routed only to other ranks' experts gets exact zeros."""
    expert_map = _ep_map(8, [1, 4, 6, 7], device)
    out, (_, _, ids) = _check_gemv(device, dtype, 7, 8, top_k, expert_map=expert_map)
    none_held = (expert_map[ids] < 0).all(dim=1)
    assert torch.equal(out[none_held], torch.zeros_like(out[none_held]))


def test_rank_holding_no_routed_expert_gives_zeros(device):
    """Every pair dropped (the rank holds only experts nobody picked): all zeros, no NaN from
    the never-written intermediate rows."""
    from engine.kernels.moe_gemv import moe_gemv_experts

    w13, w2 = _experts(8, 64, 48, torch.float32, device)
    weights, ids = _routing(4, 8, 2, device, hot=4)  # only experts 0..3 are picked
    x = torch.randn(4, 64, device=device)
    out = moe_gemv_experts(x, w13[6:], w2[6:], weights, ids, _ep_map(8, [6, 7], device))
    assert torch.equal(out, torch.zeros_like(out))


def test_nan_in_input_propagates(device):
    """A NaN in token 2's input reaches all of token 2's output and nothing else; the check
    every test uses fails on it."""
    from engine.kernels.moe_gemv import moe_gemv_experts

    w13, w2 = _experts(8, 64, 32, torch.float32, device)
    x = torch.randn(4, 64, device=device)
    x[2, 5] = float("nan")
    weights, ids = _routing(4, 8, 2, device)
    out = moe_gemv_experts(x, w13, w2, weights, ids)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3]]).any()
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(out, _reference(x.nan_to_num(), w13, w2, weights, ids), torch.float32)


def test_deterministic_and_empty(device):
    """Same batch, same bits (no atomics); a batch of zero tokens gives [0, H]."""
    from engine.kernels.moe_gemv import moe_gemv_experts

    w13, w2 = _experts(16, 64, 48, torch.float16, device)
    x = torch.randn(3, 64, device=device).half()  # 3 tokens, top-2: few programs in the interpreter
    weights, ids = _routing(3, 16, 2, device)
    first = moe_gemv_experts(x, w13, w2, weights, ids)
    assert torch.equal(first, moe_gemv_experts(x, w13, w2, weights, ids))
    empty = moe_gemv_experts(x[:0], w13, w2, weights[:0], ids[:0])
    assert empty.shape == (0, 64)
    assert torch.isfinite(first).all() and first.abs().amax() > 0


def test_tile_config_lookup(tmp_path):
    """Swept shapes take the bucket nearest by ratio; unswept shapes the default; bad tiles
    are refused by name."""
    import json

    from engine.kernels import moe_gemv
    from engine.kernels.moe_tile_configs import shape_key

    one = moe_gemv.MoEGemvConfig(moe_gemv.GemvTile(4, 512), moe_gemv.GemvTile(2, 512, 8))
    eight = moe_gemv.MoEGemvConfig(moe_gemv.GemvTile(16, 128), moe_gemv.GemvTile(8, 256))
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"configs": {shape_key(8, 64, 32, 2, torch.bfloat16): {
        "1": one.to_json(), "8": eight.to_json()}}}))
    assert moe_gemv.get_config(2, 8, 64, 32, 2, torch.bfloat16, path) == one
    assert moe_gemv.get_config(5, 8, 64, 32, 2, torch.bfloat16, path) == eight
    assert (moe_gemv.get_config(5, 8, 64, 32, 2, torch.float16, path)
            == moe_gemv.DEFAULT_CONFIG)
    with pytest.raises(ValueError, match="block_n"):
        moe_gemv.GemvTile(6, 32)
    with pytest.raises(ValueError, match="num_warps"):
        moe_gemv.GemvTile(8, 32, num_warps=3)


# --- fused_experts' dispatch -----------------------------------------------------------------


@pytest.fixture
def path_calls(monkeypatch) -> list[str]:
    """Records which path each `fused_experts` call takes (the real kernels still run)."""
    from engine.kernels import fused_moe

    calls: list[str] = []
    gemv, align = fused_moe.moe_gemv_experts, fused_moe.align_by_expert

    def record(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fused_moe, "moe_gemv_experts", record("gemv", gemv))
    monkeypatch.setattr(fused_moe, "align_by_expert", record("grouped", align))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16,
                                                                marks=pytest.mark.slow)], ids=str)
def test_dispatch_by_pair_count(device, dtype, path_calls):
    """At most GEMV_MAX_PAIRS pairs: the GEMV path; one pair more: the grouped GEMMs. Both give
    the reference, and forcing either path overrides the threshold."""
    from engine.kernels.fused_moe import GEMV_MAX_PAIRS, fused_experts

    top_k = 8
    w13, w2 = _experts(16, 64, 48, dtype, device)
    for num_tokens, use_gemv, path in (
            (1, None, "gemv"), (GEMV_MAX_PAIRS // top_k, None, "gemv"),
            (GEMV_MAX_PAIRS // top_k + 1, None, "grouped"), (1, False, "grouped"),
            (GEMV_MAX_PAIRS // top_k + 1, True, "gemv")):
        x = torch.randn(num_tokens, 64, device=device).to(dtype)
        weights, ids = _routing(num_tokens, 16, top_k, device)
        path_calls.clear()
        out = fused_experts(x, w13, w2, weights, ids, use_gemv=use_gemv)
        assert path_calls == [path], f"T={num_tokens} use_gemv={use_gemv}: {path_calls}"
        assert_close(out, _reference(x, w13, w2, weights, ids), dtype,
                     f"{path} path, T={num_tokens}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 1), (3, 8, 2), (2, 128, 8)])
def test_grouped_path_still_right_at_decode_sizes(device, dtype, num_tokens, num_experts, top_k):
    """The grouped GEMMs, forced below the threshold (test_fused_moe's small batches now take
    the GEMV path by default), with an expert map too."""
    from engine.kernels.fused_moe import fused_experts

    _skip_unsupported(device, dtype)
    w13, w2 = _experts(num_experts, 64, 48, dtype, device)
    x = torch.randn(num_tokens, 64, device=device).to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, device)
    out = fused_experts(x, w13, w2, weights, ids, use_gemv=False)
    assert_close(out, _reference(x, w13, w2, weights, ids), dtype, "grouped")
    expert_map = _ep_map(num_experts, list(range(0, num_experts, 2)), device)
    out = fused_experts(x, w13[::2].contiguous(), w2[::2].contiguous(), weights, ids,
                        expert_map=expert_map, use_gemv=False)
    assert_close(out, _reference(x, w13, w2, weights, ids, expert_map), dtype, "grouped, EP")


# --- CUDA only: real sizes, garbage-filled buffers, graph capture ---------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_experts,top_k,hidden,inter", [
    (128, 8, 2048, 768), (8, 2, 1024, 1792), (64, 1, 512, 352), (16, 8, 256, 128)])
def test_native_decode_sizes(cuda, dtype, num_experts, top_k, hidden, inter):
    """Every token count up to the threshold; the GEMV and grouped paths agree with the oracle
    (and, being the same math in fp32 before one rounding, nearly with each other)."""
    from engine.kernels.fused_moe import GEMV_MAX_PAIRS, fused_experts

    for num_tokens in sorted({1, 2, 3, GEMV_MAX_PAIRS // top_k // 2, GEMV_MAX_PAIRS // top_k}):
        out, (x, weights, ids) = _check_gemv("cuda", dtype, num_tokens, num_experts, top_k,
                                             hidden, inter)
        del out, x, weights, ids
    w13, w2 = _experts(num_experts, hidden, inter, dtype, "cuda")
    x = torch.randn(4, hidden, device="cuda").to(dtype)
    weights, ids = _routing(4, num_experts, top_k, "cuda")
    gemv = fused_experts(x, w13, w2, weights, ids, use_gemv=True)
    grouped = fused_experts(x, w13, w2, weights, ids, use_gemv=False)
    assert_close(gemv, grouped.float(), dtype, "GEMV vs grouped")


def test_native_garbage_in_fresh_buffers(cuda):
    """The intermediate buffer comes from memory full of NaN: a read of a row the gate/up
    kernel never wrote (a dropped pair's) would show up as NaN."""
    from engine.kernels.fused_moe import fused_experts

    dtype = torch.bfloat16
    w13, w2 = _experts(64, 512, 256, dtype, "cuda")
    expert_map = _ep_map(64, list(range(1, 64, 2)), "cuda")
    held = (expert_map >= 0).nonzero().flatten()
    for num_tokens, top_k in ((1, 8), (8, 8), (33, 1), (20, 2)):
        x = torch.randn(num_tokens, 512, device="cuda").to(dtype)
        weights, ids = _routing(num_tokens, 64, top_k, "cuda", hot=9)
        poison = torch.full((64 << 20,), float("nan"), device="cuda")
        del poison  # its blocks go back to the caching allocator, still NaN
        out = fused_experts(x, w13[held].contiguous(), w2[held].contiguous(), weights, ids,
                            expert_map=expert_map, use_gemv=True)
        assert_close(out, _reference(x, w13, w2, weights, ids, expert_map), dtype,
                     f"NaN-poisoned buffers, T={num_tokens} k={top_k}")


@pytest.mark.parametrize("num_tokens,top_k,with_map", [(1, 8, False), (8, 8, True),
                                                       (32, 2, False)])
def test_cuda_graph_replay_with_new_routing(cuda, num_tokens, top_k, with_map):
    """Captured once (PDL launches on Hopper), replayed with routing it never saw."""
    from engine.kernels.fused_moe import fused_experts

    dtype, num_experts = torch.bfloat16, 32
    w13, w2 = _experts(num_experts, 256, 128, dtype, "cuda")
    expert_map = _ep_map(num_experts, list(range(0, 32, 3)), "cuda") if with_map else None
    held = (expert_map >= 0).nonzero().flatten() if with_map else torch.arange(num_experts)
    local13, local2 = w13[held.cuda()].contiguous(), w2[held.cuda()].contiguous()
    x = torch.randn(num_tokens, 256, device="cuda").to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, "cuda")

    def call():
        return fused_experts(x, local13, local2, weights, ids, expert_map=expert_map)

    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for hot in (None, 2, top_k):
        new_weights, new_ids = _routing(num_tokens, num_experts, top_k, "cuda", hot)
        x.copy_(torch.randn_like(x))
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, _reference(x, w13, w2, weights, ids, expert_map), dtype,
                     f"replay hot={hot}")
