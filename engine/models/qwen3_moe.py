"""Qwen3-MoE (Qwen3MoeForCausalLM): Qwen3 attention (per-head q/k RMSNorm) with routed experts
only; dense layers where `mlp_only_layers` or `decoder_sparse_step` say so."""

from __future__ import annotations

from typing import Any

from engine.models.llama import qwen3_hf_options
from engine.models.sparse_moe import SparseMoeForCausalLM, qwen_moe_config


class Qwen3MoeForCausalLM(SparseMoeForCausalLM):
    """Qwen3-30B-A3B, Qwen3-235B-A22B and relatives."""


def qwen3_moe_hf_options(raw: dict[str, Any]) -> dict[str, Any]:
    return {**qwen3_hf_options(raw), "moe": qwen_moe_config(raw, shared_expert=False)}
