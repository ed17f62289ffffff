"""Reference paged attention in plain torch: runs on CPU and CUDA and is the kernels' oracle.

Each sequence's keys and values are gathered from the paged cache through its block table into a
padded [B, max_context, H, D] view, queries are scattered into [B, max_query, Hq, D] (decodes,
one query each, skip the scatter), and one masked `scaled_dot_product_attention` call handles
every sequence of the group, causal with respect to the cached context (so chunked prefill
attends to earlier chunks). An fp8 cache (engine/kv_cache/fp8.py) is quantized per (token,
head) row on write (values into their transposed slabs) and dequantized to the queries' dtype
after the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.metadata import AttentionMetadata, SeqGroup
from engine.kv_cache import fp8
from engine.kv_cache.fp8 import dequantize_rows, is_fp8, quantize_rows


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values. kv_layer: [num_blocks, 2, block_size, Hkv, D]; k, v: [T, Hkv, D]."""
    block_size = kv_layer.shape[2]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    if is_fp8(kv_layer):
        fp8.write_rows(kv_layer, blocks, offsets, quantize_rows(k), quantize_rows(v))
        return
    kv_layer[blocks, 0, offsets] = k
    kv_layer[blocks, 1, offsets] = v


def _padded_indices(group: SeqGroup, num_tokens: int, device) -> dict:
    """Per-token (sequence, index-in-sequence) and the [B, 1, Qmax, Cmax] causal mask."""
    if "tok_seq" in group.cache:
        return group.cache
    qs = group.query_start.to(device=device, dtype=torch.int64)
    q_lens = qs[1:] - qs[:-1]
    tok_seq = torch.repeat_interleave(torch.arange(group.num_seqs, device=device), q_lens,
                                      output_size=num_tokens)
    tok_idx = torch.arange(num_tokens, device=device) - qs[tok_seq]
    ctx = group.context_lens.to(device=device, dtype=torch.int64)
    first_q_pos = (ctx - q_lens).unsqueeze(1)  # position of each sequence's first new token
    q_pos = first_q_pos + torch.arange(group.max_query_len, device=device).unsqueeze(0)
    k_pos = torch.arange(group.max_context_len, device=device)
    mask = k_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1)  # causal; implies k_pos < context_len
    group.cache.update(tok_seq=tok_seq, tok_idx=tok_idx, mask=mask.unsqueeze(1))
    return group.cache


def _gather_kv(kv_layer: torch.Tensor, group: SeqGroup, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's K and V as [B, max_context, H, D]: one gather each; the reshape is a view
    of a plain cache's gather (an fp8 cache's keys keep their head-major strides: a copy; its
    value slabs become rows first)."""
    tables = group.block_tables.long()
    b, max_blocks = tables.shape
    _, _, bs, h, d = kv_layer.shape
    k = kv_layer[:, 0][tables].reshape(b, max_blocks * bs, h, d)[:, : group.max_context_len]
    if is_fp8(kv_layer):
        v = fp8.slabs_to_rows(fp8.value_slabs(kv_layer)[tables], bs)
        v = v.reshape(b, max_blocks * bs, h, d)[:, : group.max_context_len]
        return dequantize_rows(k, dtype), dequantize_rows(v, dtype)
    v = kv_layer[:, 1][tables].reshape(b, max_blocks * bs, h, d)[:, : group.max_context_len]
    return k, v


def attend(q: torch.Tensor, kv_layer: torch.Tensor, group: SeqGroup, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] packed new-token queries of the group -> [T, Hq, D]."""
    num_tokens, hq, d = q.shape
    idx = _padded_indices(group, num_tokens, q.device)
    k, v = _gather_kv(kv_layer, group, q.dtype)
    if group.max_query_len == 1 and num_tokens == group.num_seqs:  # decode: no q scatter
        out = F.scaled_dot_product_attention(
            q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=idx["mask"], scale=scale, enable_gqa=True)
        return out.squeeze(2)
    q_pad = q.new_zeros(group.num_seqs, group.max_query_len, hq, d)
    q_pad[idx["tok_seq"], idx["tok_idx"]] = q
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=idx["mask"], scale=scale, enable_gqa=True)
    return out.transpose(1, 2)[idx["tok_seq"], idx["tok_idx"]]


class TorchAttentionBackend:
    """The reference backend: `forward` writes this step's K/V, then `attend`s per group."""

    name = "torch"

    def forward(self, q, k, v, kv_layer, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(kv_layer, k, v, meta.slot_mapping)
        return self.attend(q, kv_layer, meta, scale)

    def attend(self, q, kv_layer, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """Attention over K/V already in the cache (the layer stored this step's K/V)."""
        nd = meta.num_decode_tokens
        parts = []
        if meta.decode is not None:
            parts.append(attend(q[:nd], kv_layer, meta.decode, scale))
        if meta.prefill is not None:
            parts.append(attend(q[nd:], kv_layer, meta.prefill, scale))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
