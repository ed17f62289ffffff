"""Hugging Face model folders: `config.json` to `ModelConfig`, safetensors streamed per tensor.

A folder holds `config.json`, either `model.safetensors` or shards listed in
`model.safetensors.index.json`, and tokenizer files. Weights keep their stored dtype and their HF
names; nothing is loaded into memory twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from engine.models.config import ModelConfig, RopeScaling
from engine.models.registry import ModelEntry, hf_model_entry
from engine.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
LM_HEAD = "lm_head.weight"
_SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True, slots=True, eq=False)
class SafetensorsWeight:
    """One stored tensor, not read yet: `narrow` reads just that slice (memory-mapped)."""

    lazy: Any = field(repr=False)  # a safetensors slice handle (`safe_open(...).get_slice`)
    shape: tuple[int, ...]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if not 0 <= dim < len(self.shape) or not 0 <= start <= start + length <= self.shape[dim]:
            raise ValueError(f"slice [{start}, {start + length}) of dim {dim} is outside a "
                             f"stored tensor of shape {self.shape}")
        return self.lazy[(slice(None),) * dim + (slice(start, start + length),)]


@dataclass(frozen=True, slots=True)
class HFModelSource:
    """An opened Hugging Face model folder: its config and where its weights are stored."""

    path: Path
    config: ModelConfig
    weight_files: tuple[Path, ...]

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, CPU tensor in stored dtype), one tensor in memory at a time."""
        for file in self.weight_files:
            with safe_open(file, framework="pt", device="cpu") as tensors:
                for name in tensors.keys():
                    if not _is_ignored(name, self.config.tie_word_embeddings):
                        yield name, tensors.get_tensor(name)

    def iter_lazy_weights(self) -> Iterator[tuple[str, SafetensorsWeight]]:
        """Yield (HF name, lazy weight): nothing is read until the loader narrows it to the
        slice its rank holds, so no rank reads a whole tensor it only owns part of."""
        for file in self.weight_files:
            with safe_open(file, framework="pt", device="cpu") as tensors:
                for name in tensors.keys():
                    if not _is_ignored(name, self.config.tie_word_embeddings):
                        lazy = tensors.get_slice(name)
                        yield name, SafetensorsWeight(lazy, tuple(lazy.get_shape()))

    def load_tokenizer(self) -> Tokenizer:
        return Tokenizer.from_folder(
            self.path, name=self.config.name, eos_token_ids=self.config.eos_token_ids
        )


def open_hf_model(folder: Path) -> HFModelSource:
    """Open an HF model folder, validating its config and that its weights are all present."""
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(
            f"{folder} is not a Hugging Face model folder: {CONFIG_FILE} is missing "
            "(expected config.json, *.safetensors weights and tokenizer files)"
        )
    config = parse_hf_config(_read_json(config_path), name=folder.name,
                             extra_eos_token_ids=_generation_eos_ids(folder))
    weight_files, tensor_names = _find_weights(folder)
    if not config.tie_word_embeddings and LM_HEAD not in tensor_names:
        raise ValueError(
            f"{folder}: {LM_HEAD} is missing from the safetensors files but config.json has "
            "tie_word_embeddings=false"
        )
    return HFModelSource(path=folder, config=config, weight_files=weight_files)


def parse_hf_config(
    raw: dict[str, Any], name: str, extra_eos_token_ids: tuple[int, ...] = ()
) -> ModelConfig:
    """Turn the contents of an HF `config.json` into a `ModelConfig`; the model registry's
    entry adds the architecture's own fields (biases, q/k norm, experts)."""
    entry = hf_model_entry(raw)
    _check_unsupported_options(raw)
    num_heads = _require(raw, "num_attention_heads")
    max_positions = _require(raw, "max_position_embeddings")
    _check_sliding_window(raw, entry, max_positions)
    rope_theta, rope_scaling = _parse_rope(raw)
    return ModelConfig(
        architecture=entry.model_type,
        vocab_size=_require(raw, "vocab_size"),
        hidden_size=_require(raw, "hidden_size"),
        intermediate_size=_require(raw, "intermediate_size"),
        num_layers=_require(raw, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=_head_dim(raw, num_heads),
        max_position_embeddings=max_positions,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_unique(_token_ids(raw.get("eos_token_id")) + extra_eos_token_ids),
        name=name,
        **entry.hf_options(raw),
    )


def _require(raw: dict[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ValueError(f"{CONFIG_FILE} is missing required field {key!r}")
    return raw[key]


def _head_dim(raw: dict[str, Any], num_heads: int) -> int:
    if raw.get("head_dim"):
        return int(raw["head_dim"])
    hidden_size = _require(raw, "hidden_size")
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_heads}) "
            f"and {CONFIG_FILE} has no head_dim"
        )
    return hidden_size // num_heads


def _check_unsupported_options(raw: dict[str, Any]) -> None:
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise ValueError(f"unsupported hidden_act {activation!r} in {CONFIG_FILE}; supported: silu")
    if raw.get("mlp_bias"):
        raise ValueError(f"mlp_bias=true in {CONFIG_FILE} is not supported")


def _check_sliding_window(raw: dict[str, Any], entry: ModelEntry, max_positions: int) -> None:
    # Mistral and Mixtral have no switch: a window is in effect whenever one is set. Qwen2/3
    # (and their MoE variants) ship a window that is off unless use_sliding_window is true.
    window = raw.get("sliding_window")
    enabled = raw.get("use_sliding_window", entry.sliding_window_by_default)
    if enabled and window is not None and window < max_positions:
        raise ValueError(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings="
            f"{max_positions}) is not supported"
        )


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters` (theta included); older files write
    # `rope_theta` and `rope_scaling`.
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta") or params.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported RoPE scaling type {rope_type!r} in {CONFIG_FILE}; "
            f"supported: {', '.join(_SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise ValueError(f"llama3 RoPE scaling in {CONFIG_FILE} is missing {missing}") from None
    return float(theta), scaling


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(token_id) for token_id in value)


def _unique(token_ids: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(token_ids))


def _generation_eos_ids(folder: Path) -> tuple[int, ...]:
    # Instruct models often list their end-of-turn ids only in generation_config.json.
    path = folder / GENERATION_CONFIG_FILE
    return _token_ids(_read_json(path).get("eos_token_id")) if path.is_file() else ()


def _find_weights(folder: Path) -> tuple[tuple[Path, ...], set[str]]:
    index_path = folder / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        weight_map: dict[str, str] = _read_json(index_path).get("weight_map") or {}
        files = tuple(folder / name for name in dict.fromkeys(sorted(weight_map.values())))
        missing = [file.name for file in files if not file.is_file()]
        if not weight_map or missing:
            raise ValueError(
                f"{index_path} is unusable: weight_map is empty or names missing shards {missing}"
            )
        return files, set(weight_map)
    single = folder / SINGLE_WEIGHTS_FILE
    if not single.is_file():
        raise ValueError(
            f"{folder} has no safetensors weights: expected {SINGLE_WEIGHTS_FILE} or "
            f"{WEIGHTS_INDEX_FILE} with its shards (other weight formats are not supported)"
        )
    with safe_open(single, framework="pt", device="cpu") as tensors:
        return (single,), set(tensors.keys())


def _is_ignored(name: str, tie_word_embeddings: bool) -> bool:
    # Old checkpoints store RoPE inverse frequencies; the model recomputes them.
    return name.endswith("rotary_emb.inv_freq") or (tie_word_embeddings and name == LM_HEAD)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
