"""The whole CUDA fast path (Triton kernels, fused RoPE + KV write, decode CUDA graphs) against
the torch reference path, and against HF transformers on a Llama-3-8B-shaped model."""

from __future__ import annotations

import pytest
import torch

from engine.attention.torch_ref import TorchAttentionBackend
from engine.builder import build_model, init_random_weights
from engine.kernels import dispatch
from engine.kv_cache.block_table import KVCacheManager
from engine.model_runner import ModelRunner
from engine.models.config import ModelConfig
from tests.kernels.generation import agreement, batch1_logits, greedy_generate, teacher_forced_top1

pytestmark = pytest.mark.gpu

# odd head count, GQA group of 3, head_dim 32
TINY = ModelConfig(architecture="llama", vocab_size=1000, hidden_size=192, intermediate_size=384,
                   num_layers=3, num_heads=6, num_kv_heads=2, head_dim=32,
                   max_position_embeddings=1024, rope_theta=10000.0)
LLAMA3_8B = ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096,
                        intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                        head_dim=128, max_position_embeddings=8192, rope_theta=500000.0)


def _runner(model, cfg: ModelConfig, backend, num_blocks: int, dtype) -> ModelRunner:
    kv = torch.zeros(cfg.num_layers, num_blocks, 2, 16, cfg.num_kv_heads, cfg.head_dim,
                     dtype=dtype, device="cuda")
    return ModelRunner(model, kv, backend, 16, cfg.vocab_size, "cuda")


def test_tiny_llama_fp32_greedy_identical_to_reference_path(cuda):
    from engine.kernels.attention_backend import TritonAttentionBackend

    model = build_model(TINY, torch.float32, "cuda")
    init_random_weights(model, seed=int(torch.randint(0, 2**31, ()).item()), std=0.1)
    lengths = [1, 5, 16, 17, 40, 200, 33, 64]
    prompts = [torch.randint(0, TINY.vocab_size, (n,)).tolist() for n in lengths]
    fast = _runner(model, TINY, TritonAttentionBackend(), 256, torch.float32)
    fast_tokens = greedy_generate(fast, prompts, max_tokens=40)
    assert fast.decode_graphs is not None and fast.decode_graphs.graphs, "no decode graph replayed"
    dispatch.use_triton(False)
    try:
        ref = _runner(model, TINY, TorchAttentionBackend(), 256, torch.float32)
        ref_tokens = greedy_generate(ref, prompts, max_tokens=40)
    finally:
        dispatch.use_triton(True)
    assert fast_tokens == ref_tokens


def test_llama3_8b_shape_bf16_top1_agrees_with_hf(cuda, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.kernels.attention_backend import TritonAttentionBackend
    from engine.models.weights import load_weights

    c = LLAMA3_8B
    hf_cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                         num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                         head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                         rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                         tie_word_embeddings=False)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    ours = build_model(c, torch.bfloat16, "cuda")
    load_weights(ours, hf.state_dict().items())
    runner = _runner(ours, c, TritonAttentionBackend(), 64, torch.bfloat16)
    prompts = torch.randint(0, c.vocab_size, (4, 48), device="cuda")
    with torch.inference_mode():
        hf_out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=24,
                             do_sample=False, pad_token_id=0)
        hf_first = hf(prompts).logits[:, -1].float()
    forced = hf_out[:, prompts.shape[1]:].tolist()
    picks, first = teacher_forced_top1(runner, KVCacheManager(64, 16), prompts.tolist(), forced)
    rate = agreement(picks, forced)
    rel = ((first - hf_first).norm() / hf_first.norm()).item()
    with capsys.disabled():
        print(f"\nRESULT llama3-8b-shape bf16 top-1 agreement with HF: {rate:.3f} "
              f"({sum(map(len, forced))} positions); prefill logits rel. diff {rel:.2e}")
    # Two bf16 implementations of a random 32-layer model drift apart by several percent
    # (6.8% and 82% agreement measured on an H200); a broken kernel gives ~100% and ~0%.
    assert rel < 0.1
    assert rate >= 0.75
    # batch 1: decode steps run the one-token GEMV (q/k/v, o) and take the graph's argmax
    seq = hf_out[0].tolist()
    logits, picked = batch1_logits(runner, KVCacheManager(64, 16), seq, prompts.shape[1])
    with torch.inference_mode():
        hf_logits = hf(hf_out[:1]).logits[0, prompts.shape[1] - 1: -1].float()
    rel1 = ((logits - hf_logits).norm() / hf_logits.norm()).item()
    with capsys.disabled():
        print(f"RESULT batch-1 decode logits rel. diff to HF over {len(picked)} steps: {rel1:.2e}")
    assert picked == logits[1:].argmax(-1).tolist()
    assert rel1 < 0.1
    del hf, ours, runner
    torch.cuda.empty_cache()
