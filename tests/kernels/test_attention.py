"""Triton paged attention (decode, prefill, mixed steps) against the torch backend in float32."""

from __future__ import annotations

import pytest
import torch

from engine.attention.metadata import AttentionMetadata
from engine.kernels.prefill_attention_configs import PrefillTileConfig
from tests.kernels.helpers import assert_close, paged_batch, reference_attention, split_groups

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (query heads, kv heads, head_dim): GQA groups of 4, 7 and 1, an odd head count, head_dim 80
HEADS = [(8, 2, 64), (14, 2, 128), (7, 7, 32), (12, 3, 80)]


def _skip_interpreted_bf16(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter gets bf16 tl.dot wrong (checked on CUDA only)")


def _meta(batch, num_decode: int) -> AttentionMetadata:
    decode, prefill = split_groups(batch.group, num_decode)
    return AttentionMetadata(batch.slot_mapping, num_decode, decode, prefill)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_decode_matches_reference(device, dtype, heads, num_splits):
    from engine.kernels.decode_attention import decode_attention

    _skip_interpreted_bf16(device, dtype)
    hq, hkv, d = heads
    block_size = 16
    # on and just after block boundaries, a single token, and many blocks
    ctx_lens = [16, 17, 32, 33, 1, 15, 700, 1025]
    batch = paged_batch([1] * len(ctx_lens), ctx_lens, hkv, d, block_size, dtype, device)
    q = torch.randn(len(ctx_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, len(ctx_lens))
    out = torch.full_like(q, float("nan"))
    decode_attention(q, batch.kv_layer, meta.decode, d ** -0.5, out, num_splits=num_splits)
    ref = reference_attention(q, batch.kv_clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, f"decode {heads} splits={num_splits}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_with_cached_context_matches_reference(device, dtype, heads, block_size):
    from engine.kernels.prefill_attention import prefill_attention

    _skip_interpreted_bf16(device, dtype)
    hq, hkv, d = heads
    # chunks after 0, 5, a block, a block + 1 and many cached tokens; lengths across tiles
    q_lens = [1, 17, 16, 100, 300, 129]
    cached = [0, 5, 16, 17, 700, 0]
    ctx_lens = [q + c for q, c in zip(q_lens, cached)]
    batch = paged_batch(q_lens, ctx_lens, hkv, d, block_size, dtype, device)
    q = torch.randn(sum(q_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, 0)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, batch.kv_layer, meta.prefill, d ** -0.5, out)
    ref = reference_attention(q, batch.kv_clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, f"prefill {heads} bs={block_size}")


# every switch of the tiled kernel: each BLOCK_N, GQA packing, the vector block-table read,
# warp specialization (off in the interpreter), heads-first grid order, small and large tiles
SWITCHES = [
    PrefillTileConfig(64, 32, 4, 2),
    PrefillTileConfig(64, 64, 4, 3, pack_gqa=True),
    PrefillTileConfig(128, 128, 8, 3, table_vec=True),
    PrefillTileConfig(64, 32, 4, 4, pack_gqa=True, table_vec=True),
    PrefillTileConfig(128, 64, 8, 3, pack_gqa=True, table_vec=True, warp_specialize=True),
    PrefillTileConfig(64, 64, 4, 3, heads_first=True),
]


def _prefill_case(device, dtype, heads, block_size, config, kv_format="auto"):
    from engine.kernels.prefill_attention import prefill_attention
    from engine.kv_cache.fp8 import cache_from_rows, dequantize_rows, quantize_rows

    hq, hkv, d = heads
    # whole prompts, chunks after a partial block / whole blocks of cache, a single token
    q_lens = [70, 33, 1, 40]
    cached = [0, 21, 48, 0]
    ctx_lens = [q + c for q, c in zip(q_lens, cached)]
    batch = paged_batch(q_lens, ctx_lens, hkv, d, block_size, dtype, device)
    layer, clean = batch.kv_layer, batch.kv_clean
    if kv_format == "fp8_e4m3":  # poisoned rows all-0xFF (NaN), the reference dequantized
        rows = quantize_rows(clean.float())
        clean = dequantize_rows(rows, torch.float32)
        rows[torch.isnan(batch.kv_layer.float()).any(dim=-1)] = 0xFF
        layer = cache_from_rows(rows)
    q = torch.randn(sum(q_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, 0)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, layer, meta.prefill, d ** -0.5, out, config=config)
    ref = reference_attention(q, clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, f"prefill {heads} bs={block_size} {config.label()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("config", SWITCHES, ids=PrefillTileConfig.label)
@pytest.mark.parametrize("heads", [(8, 2, 64), (12, 3, 80), (4, 4, 32)], ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_tile_switches_match_reference(device, dtype, config, heads, block_size):
    """GQA groups of 4 (packed), 3 (packed, rows left over in the tile, head_dim 80 padded) and
    1 (nothing to pack); block_n below, at and above the block size."""
    _skip_interpreted_bf16(device, dtype)
    _prefill_case(device, dtype, heads, block_size, config)


@pytest.mark.parametrize("config", [SWITCHES[0], SWITCHES[3]], ids=PrefillTileConfig.label)
def test_prefill_switches_over_fp8_cache_match_reference(device, config):
    _prefill_case(device, torch.float16, (8, 2, 64), 16, config, kv_format="fp8_e4m3")


def test_launch_options_fall_back_where_a_switch_cannot_apply():
    from engine.kernels.prefill_attention import launch_options

    cfg = PrefillTileConfig(64, 32, 4, 3, pack_gqa=True, table_vec=True, warp_specialize=True)
    opts = launch_options(cfg, group=4, block_size=16, interpret=True)
    assert (opts["PACK"], opts["TABLE_VEC"], opts["WARP_SPEC"]) == (4, True, False)
    assert launch_options(cfg, group=8, block_size=64, interpret=True)["PACK"] == 1  # 8 > 64/16
    assert not launch_options(cfg, group=4, block_size=64, interpret=True)["TABLE_VEC"]
    assert not launch_options(cfg, group=4, block_size=24, interpret=True)["TABLE_VEC"]
    assert launch_options(cfg, group=1, block_size=16, interpret=True)["PACK"] == 1


def test_tile_config_lookup_prefers_the_swept_entry(tmp_path):
    from engine.kernels import prefill_attention_configs as tiles

    path = tmp_path / "configs.json"
    cpu = torch.device("cpu")
    assert tiles.get_config(cpu, torch.float16, 128, 4, path) == tiles.default_config(
        torch.float16, 128)
    swept = PrefillTileConfig(64, 128, 4, 4, pack_gqa=True)
    tiles.write_config(tiles.shape_key("cpu", torch.float16, 128, 4), swept, path)
    assert tiles.get_config(cpu, torch.float16, 128, 4, path) == swept
    assert tiles.get_config(cpu, torch.bfloat16, 128, 4, path) == tiles.default_config(
        torch.bfloat16, 128)
    assert tiles.get_config(cpu, torch.float32, 128, 4, path) == tiles.default_config(
        torch.float32, 128)
    with pytest.raises(ValueError, match="block_n"):
        PrefillTileConfig(64, 48)
    with pytest.raises(ValueError, match="unknown"):
        PrefillTileConfig.from_json({"block_m": 64, "blok_n": 32})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_backend_mixed_step_writes_kv_and_matches_reference(device, dtype):
    """Decodes then prefill chunks in one step through the backend: `forward` stores K/V at the
    slots (NaN there before) and attends over them."""
    from engine.kernels.attention_backend import TritonAttentionBackend

    _skip_interpreted_bf16(device, dtype)
    hq, hkv, d = 8, 2, 64
    q_lens = [1, 1, 1, 40, 7]
    ctx_lens = [33, 16, 200, 40, 90]
    batch = paged_batch(q_lens, ctx_lens, hkv, d, 16, dtype, device)
    num_tokens = sum(q_lens)
    blk, off = batch.slot_mapping // 16, batch.slot_mapping % 16
    k = torch.randn(num_tokens, hkv, d, device=device).to(dtype)
    v = torch.randn(num_tokens, hkv, d, device=device).to(dtype)
    batch.kv_layer[blk, 0, off] = float("nan")
    batch.kv_layer[blk, 1, off] = float("nan")
    batch.kv_clean[blk, 0, off] = k
    batch.kv_clean[blk, 1, off] = v
    q = torch.randn(num_tokens, hq, d, device=device).to(dtype)
    meta = _meta(batch, 3)
    out = TritonAttentionBackend().forward(q, k, v, batch.kv_layer, meta, d ** -0.5)
    assert torch.equal(batch.kv_layer[blk, 0, off], k) and torch.equal(batch.kv_layer[blk, 1, off], v)
    ref = reference_attention(q, batch.kv_clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, "mixed step")
