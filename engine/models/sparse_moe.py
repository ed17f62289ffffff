"""Mixture-of-experts decoders built on the Llama block: same attention, embedding, stages and
LM head; the MLP of each sparse layer is a `FusedMoE` (engine/layers/moe.py), of the others the
dense Llama MLP. Mixtral, Qwen2-MoE and Qwen3-MoE differ only in their `MoEConfig` (and
attention options), which their files read from the HF config.json.

Parallelism stays in the layers: with tensor parallelism the attention and dense MLPs split as
for Llama and each `FusedMoE` splits its experts' intermediate dimension, or, with
expert_parallel_size = tp, holds a range of whole experts; the shared expert is a
tensor-parallel `LlamaMLP` whose partial output `FusedMoE` adds before its one all-reduce.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from engine.kernels import dispatch
from engine.layers.moe import FusedMoE
from engine.models.config import ModelConfig, MoEConfig
from engine.models.llama import LlamaForCausalLM, LlamaMLP
from engine.parallel import ParallelContext


class SparseMoeForCausalLM(LlamaForCausalLM):
    """A Llama-block decoder whose sparse layers route each token to its top-k experts."""

    @property
    def supports_cuda_graphs(self) -> bool:
        """Decode steps replay CUDA graphs when the experts run the fused Triton kernel (no host
        sync); the torch reference (kernels switched off) reads expert counts on the host."""
        return dispatch.triton_enabled()

    def make_mlp(self, cfg: ModelConfig, layer_idx: int, parallel: ParallelContext) -> nn.Module:
        moe = cfg.moe
        if moe is None or not moe.is_sparse(layer_idx):
            return LlamaMLP(cfg, parallel)
        shared_size = moe.shared_expert_intermediate_size
        shared = LlamaMLP(cfg, parallel, shared_size) if shared_size else None
        return FusedMoE(cfg.hidden_size, moe.intermediate_size, moe.num_experts, moe.top_k,
                        parallel, renormalize=moe.norm_topk_prob, shared_expert=shared,
                        shared_expert_gate=shared is not None)


def hf_field(raw: dict[str, Any], key: str) -> Any:
    """A required config.json field, or a ValueError naming it."""
    if raw.get(key) is None:
        raise ValueError(f"config.json is missing required field {key!r}")
    return raw[key]


def qwen_moe_config(raw: dict[str, Any], shared_expert: bool) -> MoEConfig:
    """Qwen2-MoE / Qwen3-MoE experts; `norm_topk_prob` defaults to false, as in HF."""
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (an alias)
    num_experts = raw.get("num_experts") or hf_field(raw, "num_local_experts")
    return MoEConfig(
        num_experts=int(num_experts),
        top_k=int(hf_field(raw, "num_experts_per_tok")),
        intermediate_size=int(hf_field(raw, "moe_intermediate_size")),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=(
            int(hf_field(raw, "shared_expert_intermediate_size")) if shared_expert else 0),
        decoder_sparse_step=int(raw.get("decoder_sparse_step") or 1),
        mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
    )
