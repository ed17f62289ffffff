"""Builds the pieces of an engine rank from an `EngineConfig`: model, tokenizer, KV cache.

`parallel` (default: one rank) says which slice of the model this process holds: its pipeline
stage's layers and its tensor rank's share of each; the KV cache follows the same slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.kv_cache.cache_tensor import allocate_kv_cache, num_blocks_to_allocate
from engine.loader.source import open_model
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.models.registry import model_entry
from engine.models.weights import load_weights
from engine.parallel import ParallelContext, check_parallel_sizes, kv_heads_of_rank


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM  # or a subclass: the registry's class for the architecture
    tokenizer: object  # engine.tokenizer.Tokenizer


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str,
                parallel: ParallelContext | None = None) -> LlamaForCausalLM:
    """An uninitialised model (this rank's slice) with parameters on `device` in `dtype`; its
    class is the model registry's for `cfg.architecture`."""
    parallel = parallel or ParallelContext.single()
    check_parallel_sizes(cfg, parallel.tp_size, parallel.pp_size, parallel.ep_size)
    model_class = model_entry(cfg.architecture).model_class
    with torch.device(device):
        model = model_class(cfg, parallel)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model.eval()


def init_random_weights(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random weights of the real shapes, for benchmarks: speed does not depend on the values."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0.0, std, generator=gen)


def load_model(config: EngineConfig, parallel: ParallelContext | None = None) -> LoadedModel:
    """Open the model and load this rank's slices only (lazy weights: other slices stay on
    disk)."""
    source = open_model(config.model)
    model = build_model(source.config, config.torch_dtype, config.device, parallel)
    load_weights(model, source.iter_lazy_weights())
    return LoadedModel(source.config, model, source.load_tokenizer())


def rank_kv_shape(model_cfg: ModelConfig, parallel: ParallelContext | None = None
                  ) -> tuple[int, int]:
    """(layers, KV heads) of this rank's KV cache: its stage's layers, its tensor rank's heads."""
    parallel = parallel or ParallelContext.single()
    start, end = parallel.stage_layers(model_cfg.num_layers)
    return end - start, kv_heads_of_rank(model_cfg.num_kv_heads, parallel)[1]


def num_kv_blocks_that_fit(model_cfg: ModelConfig, config: EngineConfig,
                           parallel: ParallelContext | None = None) -> int:
    """KV blocks this rank has room for; ranks of an instance all-reduce MIN over it and pass
    the result to `make_kv_cache` so every rank's cache has the same block ids."""
    num_layers, num_kv_heads = rank_kv_shape(model_cfg, parallel)
    return num_blocks_to_allocate(model_cfg, config.cache, config.torch_dtype, config.device,
                                  kv_heads_per_rank=num_kv_heads, num_layers=num_layers)


def make_kv_cache(model_cfg: ModelConfig, config: EngineConfig,
                  parallel: ParallelContext | None = None,
                  num_blocks: int | None = None) -> torch.Tensor:
    """This rank's KV cache; `num_blocks` (e.g. the minimum over ranks) overrides the fit."""
    if num_blocks is None:
        num_blocks = num_kv_blocks_that_fit(model_cfg, config, parallel)
    elif num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    num_layers, num_kv_heads = rank_kv_shape(model_cfg, parallel)
    return allocate_kv_cache(model_cfg, num_blocks, config.cache.block_size, config.torch_dtype,
                             config.device, num_kv_heads=num_kv_heads, num_layers=num_layers,
                             kv_cache_dtype=config.cache.kv_cache_dtype)
