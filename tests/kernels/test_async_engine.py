"""Asynchronous scheduling on CUDA (engine/inflight.py): the engine launches step N+1 before it
reads step N back, feeding N's tokens to N+1 from the device — into replayed decode graphs and
into eager mixed prefill/decode steps alike. Its outputs must equal the synchronous engine's on
the same weights, and every block must come back."""

from __future__ import annotations

import pytest
import torch

from engine.builder import LoadedModel, build_model, init_random_weights
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from tests.kernels.test_end_to_end import TINY

pytestmark = pytest.mark.gpu
EOS = 2


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A real (word-level) tokenizer over the tiny model's vocabulary: id i is the word w<i>."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    raw.pre_tokenizer = WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=f"w{EOS}", unk_token="w0")
    return Tokenizer(hf, "tiny-words")


def _engine(model, async_scheduling: bool) -> LLMEngine:
    config = EngineConfig(model="tiny", device="cuda", dtype="float32",
                          cache=CacheConfig(block_size=16, num_blocks=256),
                          scheduler=SchedulerConfig(max_num_batched_tokens=96),
                          async_scheduling=async_scheduling)
    return LLMEngine(config, LoadedModel(TINY, model, word_tokenizer(TINY.vocab_size)))


def _drive(engine: LLMEngine, prompts, params, late: int) -> dict[str, list[int]]:
    """Add all but `late` requests, step a while, add the rest mid-decode, run to the end."""
    tokens: dict[str, list[int]] = {}
    names = [f"r{i}" for i in range(len(prompts))]
    for name, p, sp in list(zip(names, prompts, params))[:-late]:
        engine.add_request(p, sp, request_id=name)
    for step in range(200):
        if step == 12:
            for name, p, sp in list(zip(names, prompts, params))[-late:]:
                engine.add_request(p, sp, request_id=name)
        elif step > 12 and not engine.has_unfinished():
            break
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert not engine.has_unfinished() and engine.kv_manager.is_idle()
    return tokens


def test_async_identical_to_sync_with_graphs_and_mixed_steps(cuda):
    model = build_model(TINY, torch.float32, "cuda")
    init_random_weights(model, seed=int(torch.randint(0, 2**31, ()).item()), std=0.1)
    lengths = [3, 16, 17, 40, 120, 33, 64, 200]
    prompts = [torch.randint(3, TINY.vocab_size, (n,)).tolist() for n in lengths]
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0.0),
              SamplingParams(max_tokens=30, temperature=1.0, top_k=20, seed=9, logprobs=True),
              SamplingParams(max_tokens=30, temperature=0.0, repetition_penalty=1.2),
              SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.7, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)]
    sync_engine = _engine(model, async_scheduling=False)
    sync = _drive(sync_engine, prompts, params, late=3)
    # stop at a token the greedy run actually produces, a few tokens in
    params[0] = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[sync["r0"][5]])
    sync["r0"] = sync["r0"][: sync["r0"].index(sync["r0"][5]) + 1]
    engine = _engine(model, async_scheduling=True)
    assert engine.async_scheduling
    got = _drive(engine, prompts, params, late=3)
    assert engine.runner.decode_graphs is not None and engine.runner.decode_graphs.graphs
    assert got == sync
