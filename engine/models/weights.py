"""Maps HF checkpoint tensor names onto our (fused, parallel-ready) parameters.

A checkpoint weight is a `torch.Tensor` or a lazy one: any object with `.shape` and
`.narrow(dim, start, length) -> torch.Tensor` that reads only that slice from disk. Layers with
`load_full` / `load_shard` narrow it to their rank's slice; plain parameters (norms) take it
whole. A pipeline stage skips the tensors of what it does not own (`param_names_for`), so lazy
weights of other stages are never read.

Names map through the model's `WeightNames` (engine.models.weight_names), found in the model
registry by the model's architecture. A layer whose parameters fill from several tensors has
`load_shard` (returning the shard ids it covered, or None for the one it was given) and says
which shards complete a parameter: `expected_shards(param_name)` or its `shard_offsets`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.models.registry import model_entry
from engine.models.weight_names import WeightNames


def load_weights(model: nn.Module, weights: Iterable[tuple[str, object]],
                 names: WeightNames | None = None) -> None:
    """Copy every checkpoint tensor this rank owns into its parameter; fail loudly on gaps
    and on tensors that match no parameter of the whole model. `names` defaults to the
    registry's mapping for the model's architecture."""
    if names is None:
        names = model_entry(model.config.architecture).weight_names
    params = dict(model.named_parameters())
    owners = {name: mod for name, mod in _param_owners(model)}
    loaded: set[str] = set()
    tied = getattr(model.config, "tie_word_embeddings", False)
    targets_of = getattr(model, "param_names_for", lambda name: (name,))
    for hf_name, tensor in weights:
        if "rotary_emb" in hf_name:
            continue
        name, shard = names.our_name(hf_name)
        if name == "lm_head.weight" and tied:
            continue
        targets = targets_of(name)
        if targets and any(target not in params for target in targets):
            raise ValueError(f"checkpoint tensor {hf_name!r} has no matching parameter ({name})")
        for target in targets:
            loaded.update(_load_one(params[target], owners[target], tensor, shard, target))
    _check_complete(model, loaded)


def _load_one(param: nn.Parameter, owner: nn.Module, tensor, shard: str | None,
              name: str) -> list[str]:
    """Load `tensor` into `param`; returns the keys `_check_complete` looks for."""
    if shard is not None:
        covered = owner.load_shard(param, tensor, shard) or (shard,)
        return [f"{name}:{s}" for s in covered]
    if hasattr(owner, "load_full"):
        owner.load_full(param, tensor)
    else:
        _copy(param, tensor)
    return [name]


def _copy(param: nn.Parameter, tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint "
                         f"{tuple(tensor.shape)}")
    param.data.copy_(tensor if isinstance(tensor, torch.Tensor) else
                     tensor.narrow(0, 0, tensor.shape[0]))


def _param_owners(model: nn.Module):
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            yield (f"{mod_name}.{p_name}" if mod_name else p_name), module


def _check_complete(model: nn.Module, loaded: set[str]) -> None:
    # named_parameters lists a shared (tied) parameter once, under the embedding's name
    params = dict(model.named_parameters())
    missing = []
    for name, module in _param_owners(model):
        if name not in params:
            continue
        if hasattr(module, "expected_shards"):
            shards = module.expected_shards(name.rsplit(".", 1)[-1])
        else:
            shards = getattr(module, "shard_offsets", None)
        keys = [f"{name}:{s}" for s in shards] if shards else [name]
        missing += [k for k in keys if k not in loaded]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:4]}")
