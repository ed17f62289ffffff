"""Maps HF checkpoint tensor names onto our (fused, parallel-ready) parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# HF name fragment -> (our fused module fragment, shard id)
_FUSED = {
    ".self_attn.q_proj.": (".self_attn.qkv_proj.", "q"),
    ".self_attn.k_proj.": (".self_attn.qkv_proj.", "k"),
    ".self_attn.v_proj.": (".self_attn.qkv_proj.", "v"),
    ".mlp.gate_proj.": (".mlp.gate_up_proj.", "gate"),
    ".mlp.up_proj.": (".mlp.gate_up_proj.", "up"),
}


def _our_name(hf_name: str) -> tuple[str, str | None]:
    name = hf_name.removeprefix("model.")
    for hf_part, (ours, shard) in _FUSED.items():
        if hf_part in name:
            return name.replace(hf_part, ours), shard
    return name, None


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy every checkpoint tensor into its parameter; fail loudly on gaps and extras."""
    params = dict(model.named_parameters())
    owners = {name: mod for name, mod in _param_owners(model)}
    loaded: set[str] = set()
    tied = getattr(model.config, "tie_word_embeddings", False)
    for hf_name, tensor in weights:
        if "rotary_emb" in hf_name:
            continue
        name, shard = _our_name(hf_name)
        if name == "lm_head.weight" and tied:
            continue
        if name not in params:
            raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter ({name})")
        param, owner = params[name], owners[name]
        if shard is not None:
            owner.load_shard(param, tensor, shard)
            loaded.add(f"{name}:{shard}")
        else:
            (owner.load_full if hasattr(owner, "load_full") else _copy)(param, tensor)
            loaded.add(name)
    _check_complete(model, loaded, tied)


def _copy(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(tensor.shape)}")
    param.data.copy_(tensor)


def _param_owners(model: nn.Module):
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), module


def _check_complete(model: nn.Module, loaded: set[str], tied: bool) -> None:
    missing = []
    for name, module in _param_owners(model):
        if tied and name == "lm_head.weight":
            continue
        shards = getattr(module, "shard_offsets", None)
        keys = [f"{name}:{s}" for s in shards] if shards else [name]
        missing += [k for k in keys if k not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
