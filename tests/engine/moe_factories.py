"""Tiny random Mixtral, Qwen2-MoE and Qwen3-MoE models saved with `save_pretrained`.

8 experts, top-2, an odd expert intermediate size (37). The routers' weights are scaled up so
that no token sits on a near-tie between experts (random init gives near-uniform routing,
where a 1e-7 difference could flip a top-k pick).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

from tests.engine.factories import _TINY_SHAPES, default_hf_tokenizer

_EXPERTS = dict(num_experts_per_tok=2, max_position_embeddings=512)
MOE_VARIANTS = {
    "mixtral": (MixtralConfig, dict(num_local_experts=8, intermediate_size=37)),
    "qwen2_moe": (Qwen2MoeConfig, dict(  # layer 1 dense; norm_topk_prob false (HF's default)
        num_hidden_layers=3, num_experts=8, moe_intermediate_size=37,
        shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3_moe": (Qwen3MoeConfig, dict(num_experts=8, moe_intermediate_size=37,
                                       norm_topk_prob=True)),
}
_ROUTER_SCALE = 40.0


def save_tiny_moe_model(dir: Path, arch: str, seed: int = 0, *, packed: bool = False,
                        extra_config: dict | None = None) -> Path:
    """Save a tiny random MoE `arch` model plus the default model's tokenizer into `dir`.

    transformers 5 writes per-expert tensors (transformers 4 names) by default; `packed` writes
    its in-memory layout instead (`experts.gate_up_proj` / `experts.down_proj` stacked).
    """
    config_class, options = MOE_VARIANTS[arch]
    config = config_class(**{**_TINY_SHAPES, **_EXPERTS, **options, **(extra_config or {})})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.mul_(_ROUTER_SCALE)
    dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dir, save_original_format=not packed)
    default_hf_tokenizer().save_pretrained(dir)
    return dir
