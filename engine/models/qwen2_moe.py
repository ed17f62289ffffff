"""Qwen2-MoE (Qwen2MoeForCausalLM): routed experts plus a shared expert every token runs,
scaled by sigmoid(x w_gate); q/k/v biases (`qkv_bias`); dense layers where `mlp_only_layers`
or `decoder_sparse_step` say so."""

from __future__ import annotations

from typing import Any

from engine.models.sparse_moe import SparseMoeForCausalLM, qwen_moe_config


class Qwen2MoeForCausalLM(SparseMoeForCausalLM):
    """Qwen1.5-MoE, Qwen2-57B-A14B and relatives."""


def qwen2_moe_hf_options(raw: dict[str, Any]) -> dict[str, Any]:
    return {"attention_bias": bool(raw.get("qkv_bias", True)), "o_proj_bias": False,
            "moe": qwen_moe_config(raw, shared_expert=True)}
