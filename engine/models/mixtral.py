"""Mixtral (MixtralForCausalLM): every layer sparse, the top-k routing weights always
renormalised; attention without biases, as Mistral's."""

from __future__ import annotations

from typing import Any

from engine.models.config import MoEConfig
from engine.models.sparse_moe import SparseMoeForCausalLM, hf_field


class MixtralForCausalLM(SparseMoeForCausalLM):
    """Mixtral-8x7B and relatives."""


def mixtral_hf_options(raw: dict[str, Any]) -> dict[str, Any]:
    moe = MoEConfig(num_experts=int(hf_field(raw, "num_local_experts")),
                    top_k=int(hf_field(raw, "num_experts_per_tok")),
                    intermediate_size=int(hf_field(raw, "intermediate_size")),
                    norm_topk_prob=True)
    return {"moe": moe}
