"""How a model's HF checkpoint tensor names map onto our (fused, parallel-ready) parameters.

A `WeightNames` is an ordered list of rules, one list per model family, held by the model
registry: renames applied to every name first (e.g. Mixtral's `block_sparse_moe.` -> `mlp.`),
then the first matching fusion rule names our parameter and the shard the tensor fills
(q/k/v of the fused QKV projection, gate/up, one expert's projection).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NameRule:
    """Replace `pattern` (a regex, searched) by `replacement`; the tensor fills `shard`
    (which may use the pattern's groups, e.g. r"gate.\\1"), or a whole parameter if None."""

    pattern: str
    replacement: str
    shard: str | None = None

    def apply(self, name: str) -> tuple[str, str | None] | None:
        match = re.search(self.pattern, name)
        if match is None:
            return None
        shard = match.expand(self.shard) if self.shard is not None else None
        return name[:match.start()] + match.expand(self.replacement) + name[match.end():], shard


@dataclass(frozen=True, slots=True)
class WeightNames:
    """HF checkpoint name -> (our parameter name, shard id or None)."""

    renames: tuple[NameRule, ...] = ()  # all applied, in order, before the fusion rules
    fusions: tuple[NameRule, ...] = ()  # the first that matches decides

    def our_name(self, hf_name: str) -> tuple[str, str | None]:
        name = hf_name.removeprefix("model.")
        for rule in self.renames:
            renamed = rule.apply(name)
            name = renamed[0] if renamed is not None else name
        for rule in self.fusions:
            fused = rule.apply(name)
            if fused is not None:
                return fused
        return name, None

    def extended(self, renames: tuple[NameRule, ...] = (),
                 fusions: tuple[NameRule, ...] = ()) -> WeightNames:
        """These rules plus more (the new fusions are tried first)."""
        return WeightNames(self.renames + renames, fusions + self.fusions)


LLAMA_WEIGHT_NAMES = WeightNames(fusions=(
    NameRule(r"\.self_attn\.q_proj\.", ".self_attn.qkv_proj.", "q"),
    NameRule(r"\.self_attn\.k_proj\.", ".self_attn.qkv_proj.", "k"),
    NameRule(r"\.self_attn\.v_proj\.", ".self_attn.qkv_proj.", "v"),
    NameRule(r"\.mlp\.gate_proj\.", ".mlp.gate_up_proj.", "gate"),
    NameRule(r"\.mlp\.up_proj\.", ".mlp.gate_up_proj.", "up"),
))

# Routed experts (engine.layers.moe.FusedMoE: `w13`, `w2`): transformers 4 names each expert
# (Qwen: gate_proj/up_proj/down_proj; Mixtral: w1/w3/w2), transformers 5 may store them packed
# (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]); GGUF stacks gate, up
# and down separately.
MOE_WEIGHT_NAMES = LLAMA_WEIGHT_NAMES.extended(
    renames=(NameRule(r"\.block_sparse_moe\.", ".mlp."),),
    fusions=(
        NameRule(r"\.mlp\.experts\.(\d+)\.(?:gate_proj|w1)\.weight$", ".mlp.w13", r"gate.\1"),
        NameRule(r"\.mlp\.experts\.(\d+)\.(?:up_proj|w3)\.weight$", ".mlp.w13", r"up.\1"),
        NameRule(r"\.mlp\.experts\.(\d+)\.(?:down_proj|w2)\.weight$", ".mlp.w2", r"down.\1"),
        NameRule(r"\.mlp\.experts\.gate_up_proj$", ".mlp.w13", "gate_up"),
        # GGUF (engine.loader.gguf_loader): gate and up stacked separately, [E, I, H] each
        NameRule(r"\.mlp\.experts\.gate_proj\.weight$", ".mlp.w13", "gate"),
        NameRule(r"\.mlp\.experts\.up_proj\.weight$", ".mlp.w13", "up"),
        NameRule(r"\.mlp\.experts\.down_proj\.weight$", ".mlp.w2", "down"),
        NameRule(r"\.mlp\.experts\.down_proj$", ".mlp.w2", "down"),
        NameRule(r"\.mlp\.shared_expert\.gate_proj\.", ".mlp.shared_expert.gate_up_proj.",
                 "gate"),
        NameRule(r"\.mlp\.shared_expert\.up_proj\.", ".mlp.shared_expert.gate_up_proj.", "up"),
    ),
)
