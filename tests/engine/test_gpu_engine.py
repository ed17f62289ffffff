"""The engine on CUDA with the default model (SmolLM2-135M GGUF): fp32 greedy tokens identical
to the CPU engine, and bf16 top-1 agreement with HF transformers on CUDA."""

from __future__ import annotations

import pytest
import torch

from engine.builder import load_model
from engine.config import CacheConfig, EngineConfig
from engine.llm_engine import LLMEngine
from tests.helpers import GREEDY, PROMPTS, assert_no_leaks, chat_ids

pytestmark = pytest.mark.gpu
GPU_PROMPTS = [PROMPTS[0], PROMPTS[2], PROMPTS[4], PROMPTS[5]]  # short, non-ASCII, 600+ tokens


@pytest.fixture(scope="module")
def cuda():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def _cuda_engine(dtype: str) -> LLMEngine:
    config = EngineConfig(model="default", device="cuda", dtype=dtype,
                          cache=CacheConfig(num_blocks=1024))
    return LLMEngine(config, load_model(config))


def test_cuda_fp32_greedy_identical_to_cpu_engine(cuda, make_engine, default_loaded):
    prompts = [chat_ids(default_loaded.tokenizer, p) for p in GPU_PROMPTS]
    cpu_out = make_engine().generate(prompts, GREEDY)
    engine = _cuda_engine("float32")
    gpu_out = engine.generate(prompts, GREEDY)
    assert engine.runner.decode_graphs is not None and engine.runner.decode_graphs.graphs
    for prompt, gpu, cpu in zip(GPU_PROMPTS, gpu_out, cpu_out):
        assert gpu.token_ids == cpu.token_ids, f"mismatch for prompt {prompt[:40]!r}"
    assert_no_leaks(engine)


def test_cuda_bf16_top1_agreement_with_hf(cuda, default_loaded, capsys):
    from transformers import AutoModelForCausalLM

    from engine.loader.default_model import default_gguf_path
    from tests.kernels.generation import agreement, teacher_forced_top1

    path = default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.bfloat16).cuda().eval()
    eos = default_loaded.tokenizer.eos_token_ids
    prompts = [chat_ids(default_loaded.tokenizer, p) for p in GPU_PROMPTS]
    forced = []
    for ids in prompts:  # HF greedy on CUDA, one prompt at a time (no padding)
        with torch.inference_mode():
            out = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=32,
                              do_sample=False, eos_token_id=list(eos), pad_token_id=list(eos)[0])
        forced.append(out[0, len(ids):].tolist())
    engine = _cuda_engine("bfloat16")
    picks, _ = teacher_forced_top1(engine.runner, engine.kv_manager, prompts, forced)
    rate = agreement(picks, forced)
    with capsys.disabled():
        print(f"\nRESULT SmolLM2-135M bf16 CUDA top-1 agreement with HF (teacher-forced): "
              f"{rate:.3f} over {sum(map(len, forced))} positions")
    assert rate >= 0.9
    assert_no_leaks(engine)
