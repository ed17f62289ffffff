"""The Llama family: Llama 2/3/3.1, Mistral, SmolLM2, Qwen2/2.5 (QKV bias), Qwen3 (q/k norm);
the base of the mixture-of-experts models (engine/models/sparse_moe.py).

The model knows nothing about parallelism beyond using parallel-ready layers and running only
its pipeline stage, and nothing about paging beyond handing its attention layers a
`ForwardContext`.

Pipeline stages: a stage builds only its layers (HF indices kept, so weight names match), the
first stage owns the embedding, the last the final norm and LM head. A stage's KV cache holds
its layers only, indexed stage-locally (layer `start + i` is `kv_cache[i]`), and
`ctx.on_layer_done(i)` receives that stage-local index i.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from engine.kernels import dispatch
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig
from engine.models.context import ForwardContext
from engine.parallel import ParallelContext

_LAYER_PARAM = re.compile(r"layers\.(\d+)\.")


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kv_index: int, rope: RotaryEmbedding,
                 parallel: ParallelContext) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # HF index, for names and messages
        self.kv_index = kv_index  # index into this stage's KV cache
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, parallel, bias=cfg.attention_bias)
        self.num_heads = self.qkv_proj.num_heads_per_rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads_per_rank
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, parallel,
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
        qk_norm = (None if self.q_norm is None else
                   (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps))
        kv_layer = ctx.kv_cache[self.kv_index]
        # the q/k norms, RoPE and the KV-cache store are one fused kernel on CUDA; attention
        # then reads the cache
        q = dispatch.rope_and_write_kv(q, k, v, self.rope.cos, self.rope.sin, positions, kv_layer,
                                       ctx.attn_meta.slot_mapping, qk_norm)
        out = ctx.backend.attend(q, kv_layer, ctx.attn_meta, self.scale)
        return self.o_proj(out.reshape(-1, self.num_heads * self.head_dim)), residual


class LlamaMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); `intermediate_size` defaults to the model's."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext,
                 intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or cfg.intermediate_size
        sizes = {"gate": size, "up": size}
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, sizes, parallel)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_silu_and_mul(self.gate_up_proj(x))

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(h)), h) with h = x + residual (gate/up stays with cuBLAS: no fusion)."""
        normed, residual = norm(x, residual)
        return self(normed), residual


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kv_index: int, rope: RotaryEmbedding,
                 parallel: ParallelContext, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, kv_index, rope, parallel)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, ctx: ForwardContext):
        hidden, residual = self.self_attn(positions, hidden, residual, self.input_layernorm, ctx)
        return self.mlp.forward_normed(hidden, residual, self.post_attention_layernorm)


class LlamaForCausalLM(nn.Module):
    """This stage's part of decoder stack + LM head.

    `forward` returns the final hidden states on the last stage and None on the others (which
    send their activations on); only the last stage has `compute_logits`. Subclasses with
    another MLP (mixture-of-experts) override `make_mlp`.
    """

    def __init__(self, cfg: ModelConfig, parallel: ParallelContext | None = None) -> None:
        super().__init__()
        parallel = parallel or ParallelContext.single()
        self.config = cfg
        self.parallel = parallel
        self.layer_range = parallel.stage_layers(cfg.num_layers)  # (start, end), HF indices
        start, end = self.layer_range
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta,
                               cfg.rope_scaling)
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
                             if parallel.is_first_stage else None)
        # keyed by HF layer index: parameter names stay those of the checkpoint
        self.layers = nn.ModuleDict({
            str(i): LlamaDecoderLayer(cfg, i, i - start, rope, parallel,
                                      self.make_mlp(cfg, i, parallel))
            for i in range(start, end)})
        self.num_kv_heads_per_rank = self.layers[str(start)].self_attn.num_kv_heads
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if parallel.is_last_stage else None
        self.lm_head = (ParallelLMHead(cfg.vocab_size, cfg.hidden_size, parallel)
                        if parallel.is_last_stage else None)
        if cfg.tie_word_embeddings and self.embed_tokens is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def make_mlp(self, cfg: ModelConfig, layer_idx: int, parallel: ParallelContext) -> nn.Module:
        """The MLP of decoder layer `layer_idx` (HF index)."""
        return LlamaMLP(cfg, parallel)

    @property
    def num_stage_layers(self) -> int:
        return self.layer_range[1] - self.layer_range[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor | None:
        hidden, residual = self._stage_input(input_ids)
        for i, layer in enumerate(self.layers.values()):
            hidden, residual = layer(positions, hidden, residual, ctx)
            if ctx.on_layer_done is not None:
                ctx.on_layer_done(i)  # stage-local, like the KV cache's layer axis
        if not self.parallel.is_last_stage:
            self.parallel.send_next((hidden, residual))
            return None
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def _stage_input(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, residual) entering this stage's first layer: embeddings on the first stage
        (no residual yet, as in a single-stage model), else what the previous stage sent."""
        if self.embed_tokens is not None:
            return self.embed_tokens(input_ids), None
        shape = (input_ids.shape[0], self.config.hidden_size)
        weight = self.layers[str(self.layer_range[0])].input_layernorm.weight
        hidden, residual = self.parallel.recv_prev([shape, shape], weight.dtype, weight.device)
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise ValueError(f"pipeline stage {self.parallel.pp_rank} of "
                             f"{self.parallel.pp_size} has no LM head: only the last one does")
        return self.lm_head.compute_logits(hidden)

    def param_names_for(self, name: str) -> tuple[str, ...]:
        """The parameters a checkpoint tensor (our naming) loads into on this stage.

        None for the layers, embedding, norm or head of other stages, so a stage never reads
        them; a tied embedding also feeds the LM head of a last stage that has no embedding.
        """
        layer = _LAYER_PARAM.match(name)
        if layer is not None:
            start, end = self.layer_range
            return (name,) if start <= int(layer[1]) < end else ()
        if name.startswith("embed_tokens."):
            names = (name,) if self.embed_tokens is not None else ()
            if (self.config.tie_word_embeddings and self.embed_tokens is None
                    and self.lm_head is not None):
                names += ("lm_head." + name.removeprefix("embed_tokens."),)
            return names
        if name.startswith(("norm.", "lm_head.")):
            return (name,) if self.parallel.is_last_stage else ()
        return (name,)


# Model-specific `ModelConfig` fields from an HF config.json (see engine.models.registry).
def llama_hf_options(raw: dict) -> dict:
    bias = bool(raw.get("attention_bias", False))
    return {"attention_bias": bias, "o_proj_bias": bias}


def qwen2_hf_options(raw: dict) -> dict:
    # Qwen2 always has q/k/v biases (its config.json does not say so) and none on o_proj.
    return {"attention_bias": True, "o_proj_bias": False}


def qwen3_hf_options(raw: dict) -> dict:
    return {**llama_hf_options(raw), "qk_norm": True}
