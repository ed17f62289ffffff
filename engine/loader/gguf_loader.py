"""GGUF files: metadata to `ModelConfig`, tensors dequantized to float32 under HF Llama names.

llama.cpp stores shapes reversed (a tensor listed as [576, 49152] is HF [49152, 576]) and, for the
`llama` architecture, permutes the rows of attn_q/attn_k to its own RoPE layout; both are undone
here so the weights match what transformers would load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.quants import dequantize

from engine.loader.gguf_file import GGUFFile, GGUFTensor, read_gguf
from engine.loader.tokenizer_cache import gguf_tokenizer
from engine.models.config import ModelConfig, MoEConfig
from engine.tokenizer import Tokenizer

# GGUF `general.architecture` -> ModelConfig.architecture (llama.cpp writes Mistral as llama,
# and Mixtral as llama with experts).
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                  "qwen3moe": "qwen3_moe"}
# Whether the top-k routing weights are renormalised when the file does not say
# (`{arch}.expert_weights_norm`): Mixtral always, Qwen2-MoE not, Qwen3-MoE checkpoints do.
_EXPERT_WEIGHTS_NORM = {"llama": True, "qwen2moe": False, "qwen3moe": True}
# Only llama.cpp's llama converter permutes q/k rows.
_PERMUTED_ARCHITECTURES = ("llama",)
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    # experts: stacked [E, I, H] / [E, H, I], loaded by engine.layers.moe.FusedMoE
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
# llama.cpp stores these [1, H] HF weights as vectors of H
_ROW_VECTORS = ("mlp.shared_expert_gate.weight",)
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)")
_QUANT_SUFFIX = re.compile(r"[.-](I?Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)
_REQUIRED = object()


@dataclass(frozen=True, slots=True, eq=False)
class DequantizedWeight:
    """A GGUF tensor, dequantized (whole) when a loader narrows it to its slice."""

    load: Callable[[], torch.Tensor] = field(repr=False)
    shape: tuple[int, ...]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self.load().narrow(dim, start, length)


@dataclass(frozen=True, slots=True, eq=False)
class GGUFModelSource:
    """An opened GGUF file: its config and its memory-mapped tensors."""

    path: Path
    config: ModelConfig
    reader: GGUFFile = field(repr=False)
    permute_qk: bool  # undo llama.cpp's q/k row permutation

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, float32 CPU tensor), dequantizing one tensor at a time."""
        for tensor in self.reader.tensors:
            name = hf_tensor_name(tensor.name)
            yield name, self._load(tensor, name)

    def iter_lazy_weights(self) -> Iterator[tuple[str, DequantizedWeight]]:
        """Yield (HF name, lazy weight): a tensor is dequantized only if a rank loads part of it.

        Quantized blocks run along rows, so a rank dequantizes the whole tensor and then keeps
        its slice: acceptable for the small models GGUF serves here, unlike safetensors (read
        slice by slice).
        """
        for tensor in self.reader.tensors:
            name = hf_tensor_name(tensor.name)
            shape = tuple(int(dim) for dim in reversed(tensor.shape))
            if name.endswith(_ROW_VECTORS):
                shape = (1, *shape)
            yield name, DequantizedWeight(partial(self._load, tensor, name), shape)

    def _load(self, tensor: GGUFTensor, name: str) -> torch.Tensor:
        weight = torch.from_numpy(_dequantize(tensor))
        if name.endswith(_ROW_VECTORS):
            weight = weight.reshape(1, -1)
        if self.permute_qk and name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_qk_rows(weight, self.config.num_heads)
        elif self.permute_qk and name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_qk_rows(weight, self.config.num_kv_heads)
        return weight

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer and chat template of the metadata (converted once per machine:
        engine/loader/tokenizer_cache.py)."""
        hf_tokenizer = gguf_tokenizer(self.path, self.reader.metadata_digest)
        return Tokenizer(hf_tokenizer, name=self.config.name,
                         eos_token_ids=self.config.eos_token_ids)


def open_gguf_model(path: Path) -> GGUFModelSource:
    """Open a GGUF file and read its architecture from the metadata."""
    try:
        reader = read_gguf(path)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from None
    config = gguf_model_config(reader, name=model_name_from_path(path))
    permute = _metadata(reader, "general.architecture") in _PERMUTED_ARCHITECTURES
    return GGUFModelSource(path=path, config=config, reader=reader, permute_qk=permute)


def gguf_model_config(reader: GGUFFile, name: str) -> ModelConfig:
    """Build a `ModelConfig` from the `{arch}.*` and `tokenizer.ggml.*` metadata of a GGUF file."""
    arch = _metadata(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}"
        )
    tensor_names = {tensor.name for tensor in reader.tensors}
    _check_rope_scaling(reader, arch, tensor_names)
    hidden_size = int(_metadata(reader, f"{arch}.embedding_length"))
    num_heads = _per_layer_constant(reader, f"{arch}.attention.head_count")
    head_dim = int(_metadata(reader, f"{arch}.attention.key_length", hidden_size // num_heads))
    _check_rotary_dims(reader, arch, head_dim)
    moe = _moe_config(reader, arch)
    architecture = "mixtral" if moe is not None and arch == "llama" else _ARCHITECTURES[arch]
    return ModelConfig(
        architecture=architecture,
        vocab_size=_vocab_size(reader, arch),
        hidden_size=hidden_size,
        intermediate_size=int(_metadata(reader, f"{arch}.feed_forward_length",
                                        moe.intermediate_size if moe else _REQUIRED)),
        num_layers=int(_metadata(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=_per_layer_constant(reader, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        max_position_embeddings=int(_metadata(reader, f"{arch}.context_length")),
        rms_norm_eps=float(_metadata(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_metadata(reader, f"{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        moe=moe,
        bos_token_id=_metadata(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=_eos_token_ids(reader),
        name=name,
    )


def _moe_config(reader: GGUFFile, arch: str) -> MoEConfig | None:
    """The experts of a GGUF MoE model (every layer sparse: GGUF has no mlp_only_layers)."""
    num_experts = int(_metadata(reader, f"{arch}.expert_count", 0))
    if num_experts == 0:
        return None
    dense_size = _metadata(reader, f"{arch}.feed_forward_length", None)
    expert_size = _metadata(reader, f"{arch}.expert_feed_forward_length", dense_size)
    if expert_size is None:
        raise ValueError(f"GGUF metadata key '{arch}.expert_feed_forward_length' is missing")
    return MoEConfig(
        num_experts=num_experts,
        top_k=int(_metadata(reader, f"{arch}.expert_used_count")),
        intermediate_size=int(expert_size),
        norm_topk_prob=bool(_metadata(reader, f"{arch}.expert_weights_norm",
                                      _EXPERT_WEIGHTS_NORM.get(arch, True))),
        shared_expert_intermediate_size=int(
            _metadata(reader, f"{arch}.expert_shared_feed_forward_length", 0)),
    )


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name (`blk.3.attn_q.weight`) to its HF Llama name."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    match = _LAYER_TENSOR.fullmatch(base)
    if match is None or match[2] not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}: no HF Llama equivalent is known")
    return f"model.layers.{match[1]}.{_LAYER_NAMES[match[2]]}.{kind}"


def unpermute_qk_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleaving of a q or k projection (rows = heads * dim)."""
    half_head_dim = weight.shape[0] // num_heads // 2
    per_head = weight.reshape(num_heads, half_head_dim, 2, *weight.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weight.shape).contiguous()


def model_name_from_path(path: Path) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`."""
    return _QUANT_SUFFIX.sub("", path.stem) or path.stem


def _dequantize(tensor: GGUFTensor) -> np.ndarray:
    shape = tuple(int(dim) for dim in reversed(tensor.shape))
    values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    if not values.flags.writeable:  # a view of the read-only memory map (F32 tensors)
        values = values.copy()
    return np.ascontiguousarray(values, dtype=np.float32)


def _metadata(reader: GGUFFile, key: str, default: Any = _REQUIRED) -> Any:
    found = reader.fields.get(key)
    if found is not None:
        return found
    if default is _REQUIRED:
        raise ValueError(f"GGUF metadata key {key!r} is missing")
    return default


def _per_layer_constant(reader: GGUFFile, key: str, default: Any = _REQUIRED) -> int:
    # Some converters write head counts as one value per layer.
    value = _metadata(reader, key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise ValueError(f"GGUF {key} varies per layer ({sorted(set(value))}); not supported")
        value = value[0]
    return int(value)


def _vocab_size(reader: GGUFFile, arch: str) -> int:
    value = _metadata(reader, f"{arch}.vocab_size", None)
    if value is not None:
        return int(value)
    # Older converters omit the key; the embedding's row count is the vocabulary size.
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])
    raise ValueError(f"GGUF has neither {arch}.vocab_size nor a token_embd.weight tensor")


def _eos_token_ids(reader: GGUFFile) -> tuple[int, ...]:
    # eot (end of turn) ends a chat reply just like eos does.
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
    found = (_metadata(reader, key, None) for key in keys)
    return tuple(dict.fromkeys(int(token_id) for token_id in found if token_id is not None))


def _check_rope_scaling(reader: GGUFFile, arch: str, tensor_names: set[str]) -> None:
    scaling = _metadata(reader, f"{arch}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensor_names:
        raise ValueError(
            "RoPE scaling in GGUF files is not supported; load the model's Hugging Face folder "
            "(config.json rope_scaling) instead"
        )


def _check_rotary_dims(reader: GGUFFile, arch: str, head_dim: int) -> None:
    rotary_dims = int(_metadata(reader, f"{arch}.rope.dimension_count", head_dim))
    if rotary_dims != head_dim:
        raise ValueError(
            f"partial rotary embeddings ({arch}.rope.dimension_count={rotary_dims}, "
            f"head_dim={head_dim}) are not supported"
        )
