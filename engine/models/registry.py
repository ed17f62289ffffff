"""The model registry: which HF model types we serve, with which class and weight names.

Adding a model is a new file in engine/models/ (its class and its `*_hf_options`) and one entry
here. An entry names the HF `model_type` (also our `ModelConfig.architecture`), the HF
`architectures` class names, our model class, how checkpoint tensor names map onto its
parameters, and the model-specific `ModelConfig` fields read from config.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from engine.models.llama import (LlamaForCausalLM, llama_hf_options, qwen2_hf_options,
                                 qwen3_hf_options)
from engine.models.mixtral import MixtralForCausalLM, mixtral_hf_options
from engine.models.qwen2_moe import Qwen2MoeForCausalLM, qwen2_moe_hf_options
from engine.models.qwen3_moe import Qwen3MoeForCausalLM, qwen3_moe_hf_options
from engine.models.weight_names import LLAMA_WEIGHT_NAMES, MOE_WEIGHT_NAMES, WeightNames


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One supported architecture."""

    model_type: str  # HF config.json `model_type`; our ModelConfig.architecture
    hf_architectures: tuple[str, ...]  # HF config.json `architectures` class names
    model_class: type[nn.Module]  # built as model_class(ModelConfig, ParallelContext)
    weight_names: WeightNames  # checkpoint tensor names -> our parameters
    hf_options: Callable[[dict[str, Any]], dict[str, Any]]  # its own ModelConfig fields
    sliding_window_by_default: bool = False  # a `sliding_window` applies without a switch


_ENTRIES = (
    ModelEntry("llama", ("LlamaForCausalLM",), LlamaForCausalLM, LLAMA_WEIGHT_NAMES,
               llama_hf_options),
    ModelEntry("mistral", ("MistralForCausalLM",), LlamaForCausalLM, LLAMA_WEIGHT_NAMES,
               llama_hf_options, sliding_window_by_default=True),
    ModelEntry("qwen2", ("Qwen2ForCausalLM",), LlamaForCausalLM, LLAMA_WEIGHT_NAMES,
               qwen2_hf_options),
    ModelEntry("qwen3", ("Qwen3ForCausalLM",), LlamaForCausalLM, LLAMA_WEIGHT_NAMES,
               qwen3_hf_options),
    ModelEntry("mixtral", ("MixtralForCausalLM",), MixtralForCausalLM, MOE_WEIGHT_NAMES,
               mixtral_hf_options, sliding_window_by_default=True),
    ModelEntry("qwen2_moe", ("Qwen2MoeForCausalLM",), Qwen2MoeForCausalLM, MOE_WEIGHT_NAMES,
               qwen2_moe_hf_options),
    ModelEntry("qwen3_moe", ("Qwen3MoeForCausalLM",), Qwen3MoeForCausalLM, MOE_WEIGHT_NAMES,
               qwen3_moe_hf_options),
)
_BY_MODEL_TYPE = {entry.model_type: entry for entry in _ENTRIES}
_BY_HF_ARCHITECTURE = {name: entry for entry in _ENTRIES for name in entry.hf_architectures}


def supported_architectures() -> tuple[str, ...]:
    return tuple(_BY_MODEL_TYPE)


def model_entry(architecture: str) -> ModelEntry:
    """The entry of a `ModelConfig.architecture` (an HF model_type)."""
    entry = _BY_MODEL_TYPE.get(architecture)
    if entry is None:
        raise ValueError(f"unsupported architecture {architecture!r}; "
                         f"supported: {', '.join(supported_architectures())}")
    return entry


def hf_model_entry(raw: dict[str, Any]) -> ModelEntry:
    """The entry of an HF config.json: by `model_type`, else by its `architectures`."""
    model_type = raw.get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    for name in raw.get("architectures") or ():
        if name in _BY_HF_ARCHITECTURE:
            return _BY_HF_ARCHITECTURE[name]
    raise ValueError(f"unsupported model_type {model_type!r} in config.json; "
                     f"supported: {', '.join(supported_architectures())}")
