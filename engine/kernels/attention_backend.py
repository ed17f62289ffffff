"""The CUDA attention backend: Triton paged decode and prefill kernels behind the backend API.

`attend` reads keys and values from the paged cache only; the layer has already stored this
step's K/V (on CUDA by the fused RoPE + cache-write kernel, `dispatch.rope_and_write_kv`).
`forward` keeps the reference backend's contract (store, then attend) for callers that did not.

Decode launches depend on nothing host-side but the batch size, so a decode-only step can be
captured in a CUDA graph (`supports_cuda_graphs`).
"""

from __future__ import annotations

import torch

from engine.attention.metadata import AttentionMetadata
from engine.kernels.decode_attention import decode_attention
from engine.kernels.prefill_attention import prefill_attention
from engine.kernels.triton_ops import write_kv


class TritonAttentionBackend:
    """Paged attention on CUDA through Triton kernels; same results as `TorchAttentionBackend`."""

    name = "triton"
    supports_cuda_graphs = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(kv_layer, k, v, meta.slot_mapping)
        return self.attend(q, kv_layer, meta, scale)

    def attend(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """q: [T, Hq, D] packed (decodes first) -> [T, Hq, D]."""
        if q.shape[-1] < 16:
            raise ValueError(f"the Triton attention kernels need head_dim >= 16, got {q.shape[-1]}")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = meta.num_decode_tokens
        if meta.decode is not None:
            decode_attention(q[:nd], kv_layer, meta.decode, scale, out[:nd])
        if meta.prefill is not None:
            prefill_attention(q[nd:], kv_layer, meta.prefill, scale, out[nd:])
        return out
