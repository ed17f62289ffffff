"""The slot-split down launch of the decode experts path (engine/kernels/moe_gemv.py,
`GemvTile.slots_per_program` < k): bitwise the unsplit kernel's output for the same tile, the
fp32 oracle within the usual tolerance, its ticket counters back at zero after every launch
(so launches and graph replays need no memset), and the tile files' compatibility.

In Triton's interpreter on small odd shapes (a few cases: the interpreter runs every program
in turn); natively on CUDA at the Qwen3-30B-A3B shape and under CUDA-graph replay. Setup is
test_fused_moe.py's and test_moe_gemv.py's."""

from __future__ import annotations

import json

import pytest
import torch

from tests.kernels.helpers import assert_close
from tests.kernels.test_fused_moe import _experts, _reference, _routing
from tests.kernels.test_moe_gemv import _ep_map, moe_case

pytestmark = pytest.mark.gpu


def _tiles(slots: int, block_n: int = 16, block_k: int = 16, num_warps: int = 4):
    """Interpreter-sized tiles (several N tiles and K strips at these shapes), split by
    `slots` slots a program (0: no split)."""
    from engine.kernels.moe_gemv import GemvTile, MoEGemvConfig

    return MoEGemvConfig(GemvTile(16, 16), GemvTile(block_n, block_k, num_warps, slots))


def _counters_at_zero() -> bool:
    """Every split workspace's ticket counters are back at 0 (no launch left one drawn)."""
    from engine.kernels.moe_gemv import _WORKSPACES

    return all(not counts.any() for _, counts in _WORKSPACES.values())


def _split_ran(device, num_tokens, top_k, hidden, block_n) -> bool:
    """A split launch of this shape has run (its workspace exists)."""
    import triton

    from engine.kernels.moe_gemv import _WORKSPACES

    return (device, triton.next_power_of_2(num_tokens), top_k, hidden,
            triton.cdiv(hidden, block_n)) in _WORKSPACES


def _run(x, w13, w2, weights, ids, expert_map, config):
    from engine.kernels.moe_gemv import moe_gemv_experts

    return moe_gemv_experts(x, w13, w2, weights, ids, expert_map, config)


def _check_split(device, dtype, num_tokens, num_experts, top_k, slot_choices, hidden=45,
                 inter=27, hot=None, expert_map=None, tile=(16, 16, 4)):
    """For each slots-per-program choice: bitwise the unsplit output, close to the oracle,
    counters at zero afterwards. Returns the unsplit output and the routing."""
    x, w13, w2, local13, local2, weights, ids = moe_case(
        device, dtype, num_tokens, num_experts, top_k, hidden, inter, hot, expert_map)
    what = f"T={num_tokens} E={num_experts} k={top_k} H={hidden} I={inter} tile={tile}"
    unsplit = _run(x, local13, local2, weights, ids, expert_map, _tiles(0, *tile))
    assert_close(unsplit, _reference(x, w13, w2, weights, ids, expert_map), dtype, what)
    for slots in slot_choices:
        split = _run(x, local13, local2, weights, ids, expert_map, _tiles(slots, *tile))
        assert torch.equal(split, unsplit), f"{what} slots={slots}: split != unsplit"
        assert _split_ran(x.device, num_tokens, top_k, hidden, tile[0]) == (slots < top_k)
    assert _counters_at_zero(), f"{what}: a ticket counter was left drawn"
    return unsplit, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens,num_experts,top_k,slot_choices", [
    (1, 16, 8, (1, 3)), (3, 8, 2, (1,)), (8, 8, 1, (1,))])
def test_split_is_bitwise_unsplit(device, dtype, num_tokens, num_experts, top_k, slot_choices):
    """Top-k 8 (one slot a program, and 3 + 3 + 2), 2 and 1 (s = 1 >= k: no split, the
    same launch), odd H (a partial N tile) and odd I (a partial K strip)."""
    _check_split(device, dtype, num_tokens, num_experts, top_k, slot_choices)


def test_split_with_expert_map_and_idle_experts(device):
    """Expert-parallel rank holding experts {1, 4, 6, 7} of 8, routing confined to experts
    0..4 (3 of 8 receive nothing here): -1 entries skipped in slot order, and a token routed
    only to other ranks' experts gets exact zeros."""
    expert_map = _ep_map(8, [1, 4, 6, 7], device)
    out, ids = _check_split(device, torch.float32, 5, 8, 4, (1, 2), hot=5,
                            expert_map=expert_map)
    none_held = (expert_map[ids] < 0).all(dim=1)
    assert torch.equal(out[none_held], torch.zeros_like(out[none_held]))


def test_repeated_launches_reuse_the_counters(device):
    """Launches of different token counts sharing one workspace bucket (3 and 4 tokens),
    repeated: same bits every time, counters at zero after each."""
    w13, w2 = _experts(8, 45, 27, torch.bfloat16, device)
    config = _tiles(2)
    for num_tokens in (3, 4, 3):
        x = torch.randn(num_tokens, 45, device=device).bfloat16()
        weights, ids = _routing(num_tokens, 8, 4, device)
        first = _run(x, w13, w2, weights, ids, None, config)
        assert _counters_at_zero()
        assert torch.equal(first, _run(x, w13, w2, weights, ids, None, config))
        assert torch.equal(first, _run(x, w13, w2, weights, ids, None, _tiles(0)))


def test_slots_per_program_config():
    """0 or >= k: no split; below k: ceil(k / s) groups; negative, or on the gate/up tile,
    refused by name."""
    from engine.kernels.moe_gemv import GemvTile, MoEGemvConfig

    assert [GemvTile(8, 256, 4, s).num_slot_groups(8) for s in (0, 1, 2, 3, 4, 8, 9)] == [
        1, 8, 4, 3, 2, 1, 1]
    assert GemvTile(8, 256, 4, 1).num_slot_groups(1) == 1
    with pytest.raises(ValueError, match="slots_per_program"):
        GemvTile(8, 256, 4, -1)
    with pytest.raises(ValueError, match="gate_up.slots_per_program"):
        MoEGemvConfig(GemvTile(8, 256, 4, 2), GemvTile(8, 256))


def test_tile_files_old_and_new(tmp_path):
    """Entries written before the split (no `slots_per_program`) load as no split, the
    committed file among them; a split entry round-trips through to_json / from_json."""
    from engine.kernels import moe_gemv
    from engine.kernels.moe_tile_configs import shape_key

    committed = json.loads(moe_gemv.CONFIG_PATH.read_text())["configs"]
    for buckets in committed.values():
        for raw in buckets.values():
            config = moe_gemv.MoEGemvConfig.from_json(raw)
            assert config.down.slots_per_program == raw["down"].get("slots_per_program", 0)
    split = moe_gemv.MoEGemvConfig(moe_gemv.GemvTile(2, 128, 2),
                                   moe_gemv.GemvTile(16, 256, 4, 1))
    old = {"gate_up": {"block_n": 2, "block_k": 128, "num_warps": 2},
           "down": {"block_n": 8, "block_k": 1024, "num_warps": 8}, "gemv_us": 31.3}
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"configs": {shape_key(128, 2048, 768, 8, torch.bfloat16): {
        "1": split.to_json(), "8": old}}}))
    assert moe_gemv.get_config(1, 128, 2048, 768, 8, torch.bfloat16, path) == split
    eight = moe_gemv.get_config(8, 128, 2048, 768, 8, torch.bfloat16, path)
    assert eight.down == moe_gemv.GemvTile(8, 1024, 8) and eight.down.num_slot_groups(8) == 1


# --- CUDA only: the Qwen3-30B-A3B shape, graph replay, capture without warm-up ---------------


@pytest.mark.parametrize("tile", [(4, 512, 4), (8, 1024, 8), (16, 256, 4), (8, 256, 2)],
                         ids=str)
def test_native_qwen3_shape_bitwise(cuda, tile):
    """H 2048, I 768, 128 experts, top-8, 1..8 tokens: every split bitwise the unsplit
    kernel with the same tile (the default and the committed H100 tiles among them)."""
    for num_tokens in (1, 2, 5, 8):
        _check_split("cuda", torch.bfloat16, num_tokens, 128, 8, (1, 2, 3, 4), hidden=2048,
                     inter=768, tile=tile)


@pytest.mark.parametrize("num_tokens,top_k,with_map", [(1, 8, False), (8, 8, True),
                                                       (16, 2, False)])
def test_native_graph_replay(cuda, num_tokens, top_k, with_map):
    """Captured once after a warm-up (PDL launches on Hopper), replayed under new routing
    with no memset in between: bitwise the eager unsplit kernel every replay."""
    dtype, num_experts = torch.bfloat16, 32
    w13, w2 = _experts(num_experts, 512, 256, dtype, "cuda")
    expert_map = _ep_map(num_experts, list(range(0, 32, 3)), "cuda") if with_map else None
    if with_map:
        held = (expert_map >= 0).nonzero().flatten()
        w13, w2 = w13[held].contiguous(), w2[held].contiguous()
    x = torch.randn(num_tokens, 512, device="cuda").to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, "cuda")
    split = _tiles(1, 8, 256, 4)

    def call():
        return _run(x, w13, w2, weights, ids, expert_map, split)

    call()  # compile and make the workspace outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for hot in (None, 2, top_k, None):
        new_weights, new_ids = _routing(num_tokens, num_experts, top_k, "cuda", hot)
        x.copy_(torch.randn_like(x))
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        eager = _run(x, w13, w2, weights, ids, expert_map, _tiles(0, 8, 256, 4))
        torch.cuda.synchronize()
        assert torch.equal(out, eager), f"replay hot={hot}: split graph != eager unsplit"
        assert _counters_at_zero()


def test_native_capture_without_warm_up_refused(cuda):
    """A split launch whose workspace does not exist yet cannot zero its counters inside a
    capture: refused with a message naming the fix, instead of replaying garbage tickets."""
    w13, w2 = _experts(8, 328, 64, torch.bfloat16, "cuda")  # H 328: a key no other test uses
    x = torch.randn(2, 328, device="cuda").bfloat16()
    weights, ids = _routing(2, 8, 4, "cuda")
    _run(x, w13, w2, weights, ids, None, _tiles(0))  # compiles; no workspace for the split
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm-up"):
        with torch.cuda.graph(graph):
            _run(x, w13, w2, weights, ids, None, _tiles(1))
