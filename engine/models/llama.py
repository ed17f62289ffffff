"""The Llama family: Llama 2/3/3.1, Mistral, SmolLM2, Qwen2/2.5 (QKV bias), Qwen3 (q/k norm).

The model knows nothing about parallelism beyond using parallel-ready layers, and nothing about
paging beyond handing its attention layers a `ForwardContext`.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels import dispatch
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig
from engine.models.context import ForwardContext
from engine.parallel import divide, tp_state


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        tp = tp_state().world_size
        self.layer_idx = layer_idx
        self.num_heads = divide(cfg.num_heads, tp, "num_heads")
        self.num_kv_heads = divide(cfg.num_kv_heads, tp, "num_kv_heads")
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        bias=cfg.o_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope = rope

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                norm: RMSNorm, ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over norm(hidden + residual); returns (output, the new residual)."""
        qkv, residual = self.qkv_proj.forward_normed(hidden, residual, norm)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        kv_layer = ctx.kv_cache[self.layer_idx]
        # RoPE and the KV-cache store are one fused kernel on CUDA; attention then reads the cache
        q = dispatch.rope_and_write_kv(q, k, v, self.rope.cos, self.rope.sin, positions, kv_layer,
                                       ctx.attn_meta.slot_mapping)
        out = ctx.backend.attend(q, kv_layer, ctx.attn_meta, self.scale)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim)), residual


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        sizes = {"gate": cfg.intermediate_size, "up": cfg.intermediate_size}
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, sizes)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_silu_and_mul(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, rope)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, ctx: ForwardContext):
        hidden, residual = self.self_attn(positions, hidden, residual, self.input_layernorm, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    """Decoder stack + LM head. `forward` returns final hidden states; `compute_logits` the rest."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                               cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, rope) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, ctx)
            if ctx.on_layer_done is not None:
                ctx.on_layer_done(i)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)
