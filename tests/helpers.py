"""Test helpers shared by the engine and serving tests."""

from __future__ import annotations

import torch

from engine.plan import PlanBuilder
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.request import RequestStatus

GREEDY = SamplingParams(max_tokens=48, temperature=0.0)

LONG_TEXT = (
    "The history of computing is a story of layers. Mechanical calculators gave way to "
    "electromechanical relays, relays to vacuum tubes, tubes to transistors, and transistors to "
    "integrated circuits holding billions of switches. Each layer hid the one below it, so that "
    "programmers could think in terms of files, processes and networks rather than voltages. "
)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "¿Cuál es el río más largo del mundo? Responde en español.",
    "日本の首都はどこですか？",
    "Summarize the following text in two sentences.\n\n" + LONG_TEXT * 9,
    "List three prime numbers.",
]


def build_engine(loaded, block_size: int = 16, num_blocks: int | None = 512,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                 enable_chunked_prefill: bool = True,
                 async_scheduling: bool | None = None,
                 enable_prefix_caching: bool | None = None) -> LLMEngine:
    caching = {} if enable_prefix_caching is None else {
        "enable_prefix_caching": enable_prefix_caching}  # None: CacheConfig's default
    config = EngineConfig(
        model="default", device="cpu", dtype="float32", async_scheduling=async_scheduling,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, **caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens,
                                  enable_chunked_prefill=enable_chunked_prefill))
    return LLMEngine(config, loaded=loaded)


def assert_no_leaks(engine: LLMEngine) -> None:
    """Every block back in the pool (free + cached-free == total: a block the prefix cache keeps
    with no holder is free), no request tracked: checked after every engine scenario."""
    kv = engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks, (
        f"{kv.num_blocks - kv.num_free_blocks} blocks leaked "
        f"({kv.pool.num_cached_free_blocks} cached-free counted as free)")
    assert kv.is_idle()
    assert not engine.requests and not engine.scheduler.has_unfinished()


def chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])


@torch.inference_mode()
def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    """HF transformers greedy decoding of one prompt (batch 1, no padding)."""
    input_ids = torch.tensor([prompt_ids])
    out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=list(eos_ids), pad_token_id=list(eos_ids)[0])
    return out[0, len(prompt_ids):].tolist()


@torch.inference_mode()
def hf_next_logits(hf_model, prompt_ids: list[int]) -> torch.Tensor:
    return hf_model(torch.tensor([prompt_ids])).logits[0, -1].float()


def next_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Logits after the whole prompt, through the paged runner (chunked prefill included)."""
    request = engine.make_request(prompt, SamplingParams(max_tokens=1))
    engine.scheduler.add(request)
    logits, planner = None, PlanBuilder()
    while logits is None:
        plan = engine.scheduler.schedule()
        logits, _ = engine.runner.forward_logits(planner.build(plan, engine.kv_manager.take_freed()))
        engine.scheduler.on_step_done(plan)
    engine.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
    return logits[0]


NEAR_TIE = 1e-4  # a greedy pick may differ from the reference only where its top two are this close


def assert_tokens_or_near_tie(reference: LLMEngine, prompt: list[int], params: SamplingParams,
                              got: list[int], want: list[int]) -> None:
    """`got` == `want` (the one-rank reference's tokens), or the first difference is a greedy
    pick whose top-two logits in the reference are a near-tie (nothing after it is compared:
    the sequences diverged there). A sampled token must never differ."""
    if got == want:
        return
    k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert k < min(len(got), len(want)), f"lengths differ: {got} vs {want}"
    assert params.temperature == 0.0, f"sampled token {k} differs: {got} vs {want}"
    top2 = next_logits(reference, prompt + want[:k]).topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < NEAR_TIE, f"token {k}: {got[k]} vs {want[k]}, reference top-2 gap {gap}"


def assert_greedy_matches_hf(engine: LLMEngine, hf_model, prompts: list[list[int]],
                             max_tokens: int) -> None:
    """The engine's greedy tokens for `prompts` (run together) equal HF's one by one."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompts, params)
    for prompt, out in zip(prompts, outputs):
        assert out.token_ids == hf_greedy(hf_model, prompt, max_tokens, eos_ids=[-1])
    assert_no_leaks(engine)


def assert_logits_close_to_hf(engine: LLMEngine, hf_model, prompts: list[list[int]],
                              rel_tol: float = 1e-4) -> None:
    """Next-token logits after each prompt within `rel_tol` of HF's (max abs error over the
    largest logit)."""
    for prompt in prompts:
        ours = next_logits(engine, prompt)
        ref = hf_next_logits(hf_model, prompt)
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < rel_tol, f"relative logit error {rel:.2e}"
    assert_no_leaks(engine)


def assert_equal_or_near_tie(engine, prompt: list[int], got: list[int], want: list[int]) -> None:
    """Token-identical, or the first difference is a near-tie in the reference logits."""
    if got == want:
        return
    i = next(k for k, (a, b) in enumerate(zip(got, want)) if a != b)
    logits = next_logits(engine, prompt + want[:i])
    gap = (logits[want[i]] - logits[got[i]]).abs().item()
    assert gap < 1e-3 * logits.abs().max().item(), (
        f"token {i} differs ({got[i]} vs {want[i]}) and is not a near-tie (gap {gap:.4f})")
