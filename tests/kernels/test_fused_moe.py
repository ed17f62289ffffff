"""The fused MoE kernel (engine/kernels/fused_moe.py) against the torch reference
`fused_experts_ref` in float32: on CUDA over decode and prefill sizes in bf16/fp16, and in
Triton's interpreter on small shapes (fp32 and fp16: the interpreter's bf16 `tl.dot` returns
garbage, ~1e10 off on a plain 16x32 @ 32x16 product, so bf16 is checked on CUDA only).
Also: the on-device alignment's layout, expert maps that drop experts, experts without tokens,
garbage (NaN) in every buffer the kernel allocates, and replay of a captured CUDA graph under
new routing."""

from __future__ import annotations

import pytest
import torch

from engine.layers.moe import fused_experts_ref, select_experts
from tests.gpu_tokenizer import default_tokenizer_or_skip
from tests.kernels.helpers import assert_close

pytestmark = pytest.mark.gpu

GPU_ONLY_DTYPES = (torch.bfloat16,)


def _experts(num_experts: int, hidden: int, inter: int, dtype, device):
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, device=device) / inter**0.5).to(dtype)
    return w13, w2


def _routing(num_tokens: int, num_experts: int, top_k: int, device, hot: int | None = None):
    """Softmax top-k routing; with `hot`, only experts [0, hot) can win (the rest get none)."""
    logits = torch.randn(num_tokens, num_experts, device=device)
    if hot is not None:
        logits[:, hot:] = -1e4
    return select_experts(logits, top_k, renormalize=True)


def _reference(x, w13, w2, weights, ids, expert_map=None):
    """fp32 oracle; an expert map's dropped pairs are given zero weight over the global experts."""
    if expert_map is not None:
        weights = weights * (expert_map[ids] >= 0)
    return fused_experts_ref(x.float(), w13.float(), w2.float(), weights, ids)


def _skip_unsupported(device, dtype) -> None:
    if device == "cpu" and dtype in GPU_ONLY_DTYPES:
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly; bf16 runs on CUDA")


def _check(device, dtype, num_tokens, num_experts, top_k, hidden=64, inter=48, hot=None):
    from engine.kernels.fused_moe import fused_experts

    _skip_unsupported(device, dtype)
    w13, w2 = _experts(num_experts, hidden, inter, dtype, device)
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, device, hot)
    out = fused_experts(x, w13, w2, weights, ids)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close(out, _reference(x, w13, w2, weights, ids), dtype,
                 f"T={num_tokens} E={num_experts} k={top_k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [
    (1, 8, 1), (3, 8, 2), (1, 128, 8), (5, 16, 8), (40, 8, 2), (17, 64, 8)])
def test_small_batches(device, dtype, num_tokens, num_experts, top_k):
    """Interpreter-sized: decode-like batches, top-k 1/2/8, 8..128 experts (most get nothing)."""
    _check(device, dtype, num_tokens, num_experts, top_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_experts_without_tokens(device, dtype):
    """Only 3 of 32 experts receive tokens; an odd intermediate size and hidden size."""
    _check(device, dtype, 24, 32, 2, hidden=72, inter=40, hot=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_expert_map_drops_other_ranks_experts(device, dtype):
    """Rank holding global experts {1, 4, 6, 7} of 8: the other experts' pairs add zero."""
    from engine.kernels.fused_moe import fused_experts

    _skip_unsupported(device, dtype)
    w13, w2 = _experts(8, 64, 32, dtype, device)
    held = torch.tensor([1, 4, 6, 7], device=device)
    expert_map = torch.full((8,), -1, dtype=torch.int32, device=device)
    expert_map[held] = torch.arange(4, dtype=torch.int32, device=device)
    x = torch.randn(30, 64, device=device).to(dtype)
    for top_k in (1, 2):
        weights, ids = _routing(30, 8, top_k, device)
        out = fused_experts(x, w13[held], w2[held], weights, ids, expert_map=expert_map)
        ref = _reference(x, w13, w2, weights, ids, expert_map)
        assert_close(out, ref, dtype, f"expert map, k={top_k}")
        none_held = (expert_map[ids] < 0).all(dim=1)  # tokens routed only to other ranks
        assert torch.equal(out[none_held], torch.zeros_like(out[none_held]))


def test_alignment_layout(device):
    """Every kept pair appears once, in its expert's block, in pair order; padding is the
    sentinel; blocks past the used ones say -1."""
    from engine.kernels.moe_align import align_by_expert, max_padded_pairs

    num_experts, top_k, block_m = 16, 4, 16
    expert_map = torch.arange(num_experts, dtype=torch.int32, device=device)
    expert_map[::3] = -1
    for num_tokens in (1, 9, 300):  # 300 * 4 pairs: several chunks (the two-kernel path)
        ids = _routing(num_tokens, num_experts, top_k, device)[1]
        blocks = align_by_expert(ids, num_experts, block_m, expert_map)
        n = int(blocks.num_padded.item())
        num_pairs = ids.numel()
        assert blocks.sorted_pair_ids.numel() == max_padded_pairs(num_pairs, num_experts, block_m)
        local = expert_map[ids.reshape(-1)].long()
        pairs = blocks.sorted_pair_ids[:n].long().cpu()
        block_experts = blocks.block_expert_ids.long().cpu()
        kept = pairs[pairs < num_pairs]
        assert torch.equal(kept, torch.argsort(local.cpu() + (local.cpu() < 0) * 10**6,
                                               stable=True)[: kept.numel()])
        assert torch.equal(local.cpu()[kept], block_experts[(pairs < num_pairs).nonzero()
                                                           .flatten() // block_m])
        assert (pairs[pairs >= num_pairs] == num_pairs).all() and n % block_m == 0
        assert (block_experts[: n // block_m] >= 0).all()
        assert (block_experts[n // block_m:] == -1).all()


def test_nan_in_output_fails_the_check(device):
    """The checker every test uses: one NaN in the kernel's output fails it."""
    from engine.kernels.fused_moe import fused_experts

    w13, w2 = _experts(8, 64, 32, torch.float32, device)
    x = torch.randn(4, 64, device=device)
    x[2, 5] = float("nan")  # token 2's experts see a NaN input
    weights, ids = _routing(4, 8, 2, device)
    out = fused_experts(x, w13, w2, weights, ids)
    assert torch.isnan(out[2]).all() and not torch.isnan(out[[0, 1, 3]]).any()
    with pytest.raises(AssertionError, match="NaN"):
        assert_close(out, _reference(x.nan_to_num(), w13, w2, weights, ids), torch.float32)


def test_rejects_bad_input(device):
    from engine.kernels.fused_moe import fused_experts

    w13, w2 = _experts(8, 64, 32, torch.float32, device)
    x = torch.randn(4, 64, device=device)
    weights, ids = _routing(4, 8, 2, device)
    with pytest.raises(ValueError, match="topk_weights"):
        fused_experts(x, w13, w2, weights.half(), ids)
    with pytest.raises(ValueError, match="w13"):
        fused_experts(x, w13[:, :, :32], w2, weights, ids)
    with pytest.raises(ValueError, match="expert_map"):
        fused_experts(x, w13, w2, weights, ids, expert_map=torch.arange(8, device=device))


# --- CUDA only: real sizes, garbage-filled buffers, graph capture ---------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 256, 1000, 4096])
@pytest.mark.parametrize("num_experts,top_k,hidden,inter", [
    (128, 8, 2048, 768), (8, 2, 1024, 1792), (64, 1, 512, 352), (16, 8, 256, 128)])
def test_native_sizes(cuda, dtype, num_tokens, num_experts, top_k, hidden, inter):
    _check("cuda", dtype, num_tokens, num_experts, top_k, hidden, inter)


def test_native_garbage_in_fresh_buffers(cuda):
    """Buffers the kernel allocates come from memory full of NaN: any read of a slot it never
    wrote (padding rows, unused blocks, dropped pairs) would show up as NaN."""
    from engine.kernels.fused_moe import fused_experts

    dtype = torch.bfloat16
    w13, w2 = _experts(64, 512, 256, dtype, "cuda")
    expert_map = torch.arange(64, dtype=torch.int32, device="cuda")
    expert_map[::2] = -1
    for num_tokens, top_k in ((1, 8), (33, 2), (500, 8)):
        x = torch.randn(num_tokens, 512, device="cuda").to(dtype)
        weights, ids = _routing(num_tokens, 64, top_k, "cuda", hot=9)
        poison = torch.full((64 << 20,), float("nan"), device="cuda")
        del poison  # its blocks go back to the caching allocator, still NaN
        out = fused_experts(x, w13, w2, weights, ids, expert_map=expert_map)
        assert_close(out, _reference(x, w13, w2, weights, ids, expert_map), dtype,
                     f"NaN-poisoned buffers, T={num_tokens}")


@pytest.mark.parametrize("num_tokens,top_k", [(1, 8), (48, 2)])
def test_cuda_graph_replay_with_new_routing(cuda, num_tokens, top_k):
    """Captured once, replayed with routing it never saw (other experts, other counts)."""
    from engine.kernels.fused_moe import fused_experts

    dtype, num_experts = torch.bfloat16, 32
    w13, w2 = _experts(num_experts, 256, 128, dtype, "cuda")
    x = torch.randn(num_tokens, 256, device="cuda").to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, "cuda")
    fused_experts(x, w13, w2, weights, ids)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids)
    for hot in (None, 2, top_k):
        new_weights, new_ids = _routing(num_tokens, num_experts, top_k, "cuda", hot)
        x.copy_(torch.randn_like(x))
        weights.copy_(new_weights)
        ids.copy_(new_ids)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, _reference(x, w13, w2, weights, ids), dtype, f"replay hot={hot}")


def test_tile_config_lookup(tmp_path):
    """Swept shapes take the bucket nearest by ratio; unswept shapes the default; bad tiles
    are refused by name."""
    import json

    from engine.kernels import moe_tile_configs as tiles

    decode = tiles.MoETileConfig(16, tiles.GemmTile(32, 256), tiles.GemmTile(64, 128))
    prefill = tiles.MoETileConfig(128, tiles.GemmTile(128, 64), tiles.GemmTile(128, 64))
    key = tiles.shape_key(8, 64, 32, 2, torch.bfloat16)
    path = tmp_path / "configs.json"
    path.write_text(json.dumps({"configs": {key: {"1": decode.to_json(),
                                                  "1024": prefill.to_json()}}}))
    assert tiles.get_config(3, 8, 64, 32, 2, torch.bfloat16, path) == decode
    assert tiles.get_config(600, 8, 64, 32, 2, torch.bfloat16, path) == prefill
    assert (tiles.get_config(600, 8, 64, 32, 2, torch.float16, path)
            == tiles.default_config(600, 8, 2))
    with pytest.raises(ValueError, match="block_k"):
        tiles.GemmTile(64, 48)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_engine_on_cuda_gives_the_reference_tokens(cuda, tmp_path, monkeypatch, arch):
    """A tiny MoE model through LLMEngine on CUDA (fp32: the fused kernel in the layer, decode
    steps in CUDA graphs) gives the greedy tokens of the same engine on the CPU (the torch
    reference)."""
    default_tokenizer_or_skip(monkeypatch)
    from engine.config import CacheConfig, EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from tests.engine.moe_factories import save_tiny_moe_model
    from tests.helpers import assert_equal_or_near_tie

    model = str(save_tiny_moe_model(tmp_path / arch, arch, seed=3))
    prompts = [[5 + (7 * i + 3 * j) % 300 for i in range(9 + 13 * j)] for j in range(5)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs, engines = {}, {}
    for device in ("cpu", "cuda"):
        engines[device] = LLMEngine(EngineConfig(model=model, device=device, dtype="float32",
                                                 cache=CacheConfig(block_size=16, num_blocks=64)))
        outs[device] = [o.token_ids for o in engines[device].generate(prompts, params)]
    graphs = engines["cuda"].runner.decode_graphs
    assert graphs is not None and graphs.graphs, "decode steps did not replay CUDA graphs"
    for prompt, got, want in zip(prompts, outs["cuda"], outs["cpu"]):
        assert_equal_or_near_tie(engines["cpu"], prompt, got, want)
