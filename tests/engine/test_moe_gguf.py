"""GGUF MoE files (llama.cpp's layout: Mixtral as `llama` with experts, `qwen2moe` with its
shared expert, `qwen3moe`; experts stacked as ffn_{gate,up,down}_exps) load into exactly the parameters the HF folder gives, so
they serve the tokens that tests/engine/test_moe_models.py checks against HF."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.builder import build_model
from engine.loader.source import open_model
from engine.models.weights import load_weights
from tests.engine.moe_factories import save_tiny_moe_model

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
    "mlp.experts.down_proj": "ffn_down_exps", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def _tensors(state: dict[str, torch.Tensor], arch: str, heads: int, kv_heads: int):
    """(GGUF name, array) of an HF in-memory (packed experts) state dict."""
    for name, tensor in state.items():
        values = tensor.float().numpy()
        has_kind = name.endswith((".weight", ".bias"))  # packed experts have no suffix
        base, kind = name.rsplit(".", 1) if has_kind else (name, "weight")
        if base in _GLOBAL:
            yield f"{_GLOBAL[base]}.{kind}", values
            continue
        _, _, layer, suffix = base.split(".", 3)
        if suffix == "mlp.experts.gate_up_proj":
            half = values.shape[1] // 2
            yield f"blk.{layer}.ffn_gate_exps.weight", values[:, :half]
            yield f"blk.{layer}.ffn_up_exps.weight", values[:, half:]
            continue
        if arch == "llama" and suffix in ("self_attn.q_proj", "self_attn.k_proj"):
            num = heads if "q_proj" in suffix else kv_heads  # llama.cpp's RoPE row order
            values = values.reshape(num, 2, -1, values.shape[-1]).swapaxes(1, 2)
            values = values.reshape(tensor.shape)
        if suffix == "mlp.shared_expert_gate":
            values = values.reshape(-1)  # llama.cpp: a vector of H
        yield f"blk.{layer}.{_LAYER[suffix]}.{kind}", values


def write_moe_gguf(folder, path, model_type: str) -> None:
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    cfg, arch = hf.config, _GGUF_ARCH[model_type]
    writer = gguf.GGUFWriter(path, arch)
    expert_size = getattr(cfg, "moe_intermediate_size", cfg.intermediate_size)
    for key, value in [("block_count", cfg.num_hidden_layers), ("context_length", 512),
                       ("embedding_length", cfg.hidden_size),
                       ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads),
                       ("attention.key_length", cfg.head_dim),
                       ("expert_count", cfg.num_experts if model_type != "mixtral"
                        else cfg.num_local_experts),
                       ("expert_used_count", cfg.num_experts_per_tok),
                       ("expert_feed_forward_length", expert_size),
                       ("expert_shared_feed_forward_length",
                        getattr(cfg, "shared_expert_intermediate_size", 0))]:
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"])
    writer.add_eos_token_id(2)
    for name, values in _tensors(hf.state_dict(), arch, cfg.num_attention_heads,
                                 cfg.num_key_value_heads):
        writer.add_tensor(name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _loaded(model_path) -> tuple[object, dict[str, torch.Tensor]]:
    source = open_model(model_path)
    model = build_model(source.config, torch.float32, "cpu")
    load_weights(model, source.iter_lazy_weights())
    return source.config, model.state_dict()


@pytest.mark.parametrize("model_type", list(_GGUF_ARCH))
def test_gguf_moe_loads_the_parameters_of_the_hf_folder(tmp_path, model_type):
    # GGUF has no dense layers among sparse ones (Qwen2-MoE's mlp_only_layers)
    folder = save_tiny_moe_model(tmp_path / model_type, model_type,
                                 extra_config={"mlp_only_layers": []})
    path = tmp_path / f"{model_type}.F32.gguf"
    write_moe_gguf(folder, path, model_type)
    hf_config, hf_params = _loaded(folder)
    gguf_config, gguf_params = _loaded(path)
    assert gguf_config.architecture == hf_config.architecture == model_type
    assert gguf_config.moe == hf_config.moe
    assert hf_params.keys() == gguf_params.keys()
    for name, tensor in hf_params.items():
        torch.testing.assert_close(gguf_params[name], tensor, rtol=0, atol=0, msg=name)
