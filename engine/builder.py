"""Builds the pieces of an engine instance from an `EngineConfig`: model, tokenizer, KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.kv_cache.cache_tensor import allocate_kv_cache, num_blocks_to_allocate
from engine.loader.source import open_model
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.models.weights import load_weights


@dataclass(slots=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: object  # engine.tokenizer.Tokenizer


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    """An uninitialised model with parameters already on `device` in `dtype`."""
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
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


def load_model(config: EngineConfig) -> LoadedModel:
    source = open_model(config.model)
    model = build_model(source.config, config.torch_dtype, config.device)
    load_weights(model, source.iter_weights())
    return LoadedModel(source.config, model, source.load_tokenizer())


def make_kv_cache(model_cfg: ModelConfig, config: EngineConfig) -> torch.Tensor:
    num_blocks = num_blocks_to_allocate(model_cfg, config.cache, config.torch_dtype, config.device)
    return allocate_kv_cache(model_cfg, num_blocks, config.cache.block_size, config.torch_dtype,
                             config.device)
