"""Factories for engine tests: tiny random Hugging Face models that share a real tokenizer."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig,
                          PreTrainedTokenizerBase, Qwen2Config, Qwen3Config)

from engine.loader import default_gguf_path
from engine.loader.gguf_loader import open_gguf_model

TINY_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
}
# Vocab of the default model's tokenizer; hidden 64 keeps the embedding at 3M parameters.
_TINY_SHAPES = dict(
    vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
    bos_token_id=1, eos_token_id=2,
)
_LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=64, rope_theta=50000.0,
)


@lru_cache(maxsize=1)
def default_hf_tokenizer() -> PreTrainedTokenizerBase:
    """The default model's tokenizer, built from its GGUF once per test process."""
    return open_gguf_model(default_gguf_path()).load_tokenizer().hf_tokenizer


def save_tiny_hf_model(
    dir: Path, arch: str, seed: int = 0, *, rope_scaling: bool = False, shard: bool = False,
    tie_word_embeddings: bool = False, dtype: torch.dtype = torch.float32,
    extra_config: dict | None = None,
) -> Path:
    """Save a tiny random `arch` model plus the default model's tokenizer into `dir`.

    `rope_scaling` adds llama3 RoPE scaling (llama only); `shard` splits the weights into several
    safetensors files with an index.
    """
    if arch not in _CONFIG_CLASSES:
        raise ValueError(f"arch must be one of {', '.join(TINY_ARCHITECTURES)}, got {arch!r}")
    if rope_scaling and arch != "llama":
        raise ValueError(f"rope_scaling is only set up for llama, got arch {arch!r}")
    options = dict(_TINY_SHAPES, tie_word_embeddings=tie_word_embeddings, **(extra_config or {}))
    if rope_scaling:
        options["rope_parameters"] = dict(_LLAMA3_ROPE)
    config = _CONFIG_CLASSES[arch](**options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dir, safe_serialization=True, max_shard_size="4MB" if shard else "5GB")
    default_hf_tokenizer().save_pretrained(dir)
    return dir
