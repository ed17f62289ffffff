"""On a GPU: after the start-up warm-up (engine/warmup.py), serving compiles no Triton kernel
(engine/compile_watch.py). The workload mixes what made the warm-up miss variants on an H100:
eager mixed prefill + decode steps at many batch sizes (the decode split count follows the
batch), block tables of every width (a row stride of 1, a multiple of 16, neither), the
sort-free top-p alone and the sorting path, batches of every size (the sampling tensors'
alignment), chunked prefill and prefix-cache hits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import compile_watch
from engine.builder import LoadedModel, build_model, init_random_weights
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.models.config import MoEConfig
from engine.sampling_params import SamplingParams
from tests.kernels.test_async_engine import word_tokenizer
from tests.kernels.test_end_to_end import TINY

# a MoE model: 16 experts, top-4, so the GEMV path serves up to 16 tokens and the grouped
# GEMMs' tiles (default configurations by rows per expert) change at 64 and 512 tokens
TINY_MOE = dataclasses.replace(TINY, architecture="qwen3_moe", qk_norm=True, moe=MoEConfig(
    num_experts=16, top_k=4, intermediate_size=96, norm_topk_prob=True))

pytestmark = pytest.mark.gpu

_PARAMS = (
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
    SamplingParams(max_tokens=7, temperature=0.7, top_k=20, seed=2, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.9, top_p=0.5, seed=3, ignore_eos=True),
)


def _serve(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """Requests arrive a few at a time while others decode (mixed steps at changing batch
    sizes); runs to the end within a bounded number of steps."""
    pending = list(zip(prompts, params))
    for step in range(2000):
        if pending and step % 3 == 0:
            for prompt, sp in pending[: 1 + step % 4]:
                engine.add_request(prompt, sp)
            pending = pending[1 + step % 4:]
        if not pending and not engine.has_unfinished():
            break
        engine.step()
    assert not pending and not engine.has_unfinished()
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


@pytest.mark.parametrize("cfg,async_scheduling", [(TINY, False), (TINY, True),
                                                   (TINY_MOE, True)], ids=["sync", "async", "moe"])
def test_serving_compiles_nothing_after_the_warm_up(cuda, cfg, async_scheduling):
    """On a MoE model also: the fused MoE kernels' tile variants at every step size (the
    warm-up's `moe_prompt_lengths`) and no specialization on the token count (odd and even
    pair counts, multiples of 16 or not)."""
    model = build_model(cfg, torch.bfloat16, "cuda")
    init_random_weights(model, seed=3, std=0.1)
    config = EngineConfig(model="tiny", device="cuda", dtype="bfloat16",
                          cache=CacheConfig(block_size=16, num_blocks=512),
                          scheduler=SchedulerConfig(max_num_seqs=24, max_num_batched_tokens=256),
                          async_scheduling=async_scheduling)
    engine = LLMEngine(config, LoadedModel(cfg, model, word_tokenizer(cfg.vocab_size)))
    watch = compile_watch.WATCH
    assert watch.armed
    before = watch.count
    gen = torch.Generator().manual_seed(7)
    lengths = [1, 2, 15, 16, 17, 31, 33, 48, 64, 100, 129, 250, 300, 511, 700, 3, 5, 8, 9, 40,
               80, 160, 257, 23, 7, 12]
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    params = [_PARAMS[i % len(_PARAMS)] for i in range(len(prompts))]
    _serve(engine, prompts, params)
    # a second round on the same prompts: prefix-cache hits (a chunk attending to cached blocks)
    _serve(engine, [p + [5, 6, 7] for p in prompts], params[::-1])
    # top-p alone at batch sizes 1..5 (no top-k in the batch: the sort-free path)
    for batch in range(1, 6):
        _serve(engine, prompts[:batch], [_PARAMS[1]] * batch)
    assert watch.count == before, (
        f"{watch.count - before} Triton compilations after the warm-up: {list(watch.recent)}")
