"""Drive a `ModelRunner` without an engine (no tokenizer needed): greedy generation through the
real scheduler, and teacher-forced top-1 picks for agreement checks against HF transformers."""

from __future__ import annotations

import torch

from engine.config import SchedulerConfig
from engine.kv_cache.block_table import KVCacheManager
from engine.model_runner import ModelRunner
from engine.plan import PlanBuilder
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

_GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def greedy_generate(runner: ModelRunner, prompts: list[list[int]], max_tokens: int,
                    max_num_batched_tokens: int = 64, max_model_len: int = 1024) -> list[list[int]]:
    """Continuous batching with chunked prefill under a small token budget, so that steps mix
    prefill chunks and decodes; returns each prompt's `max_tokens` greedy tokens."""
    kv = KVCacheManager(runner.kv_cache.shape[1], runner.block_size)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens), kv)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    requests = [Request(f"r{i}", p, params, 0, max_model_len) for i, p in enumerate(prompts)]
    for r in requests:
        scheduler.add(r)
    planner = PlanBuilder()
    while scheduler.has_unfinished():
        plan = scheduler.schedule()
        sampled = runner.execute(planner.build(plan, kv.take_freed()))
        scheduler.on_step_done(plan)
        if sampled is None:
            continue
        for chunk, token in zip([c for c in plan.chunks if c.samples], sampled.token_ids.tolist()):
            chunk.request.output_token_ids.append(token)
            if len(chunk.request.output_token_ids) >= max_tokens:
                scheduler.finish(chunk.request, RequestStatus.FINISHED_LENGTH)
    if not kv.is_idle():
        raise RuntimeError("blocks leaked")
    return [r.output_token_ids for r in requests]


@torch.inference_mode()
def teacher_forced_top1(runner: ModelRunner, kv: KVCacheManager, prompts: list[list[int]],
                        forced: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Our argmax after each prompt and after each of its forced tokens but the last (one prefill
    step, then decode steps fed the forced tokens; sequences may differ in length).
    Returns (picks, the prefill step's logits)."""
    requests = [Request(f"tf{i}", p, _GREEDY, 0, 1 << 30) for i, p in enumerate(prompts)]
    planner = PlanBuilder()
    for r, f in zip(requests, forced):
        kv.grow(r.request_id, len(r.prompt_token_ids) + len(f))
    try:
        chunks = [ScheduledChunk(r, 0, r.num_tokens, kv.block_table(r.request_id), True)
                  for r in requests]
        logits, _ = runner.forward_logits(planner.build(SchedulerOutput(chunks)))
        first_logits = logits.clone()
        picks = [[t] for t in logits.argmax(-1).tolist()]
        for step in range(max(map(len, forced)) - 1):
            active = [i for i, f in enumerate(forced) if len(f) > step + 1]
            for i in active:
                requests[i].output_token_ids.append(forced[i][step])
            chunks = [ScheduledChunk(requests[i], requests[i].num_tokens - 1, 1,
                                     kv.block_table(requests[i].request_id), True) for i in active]
            logits, _ = runner.forward_logits(planner.build(SchedulerOutput(chunks)))
            for i, t in zip(active, logits.argmax(-1).tolist()):
                picks[i].append(t)
        return picks, first_logits
    finally:
        for r in requests:
            kv.free(r.request_id)
        runner.tables.apply(planner.build(SchedulerOutput(), kv.take_freed()))


def agreement(picks: list[list[int]], reference: list[list[int]]) -> float:
    pairs = [(a, b) for p, r in zip(picks, reference) for a, b in zip(p, r)]
    return sum(a == b for a, b in pairs) / len(pairs)


@torch.inference_mode()
def batch1_logits(runner: ModelRunner, kv: KVCacheManager, tokens: list[int],
                  prompt_len: int) -> tuple[torch.Tensor, list[int]]:
    """One sequence fed `tokens`: a prefill of the first `prompt_len`, then one decode step per
    further token through `execute` (the batch-1 CUDA graph when there is one). Returns the
    logits predicting tokens[prompt_len:] ([n, V]) and the ids `execute` picked at each decode.
    Needs a runner with decode graphs (their static logits are read back)."""
    request = Request("b1", tokens[:prompt_len], _GREEDY, 0, 1 << 30)
    kv.grow(request.request_id, len(tokens))
    table = kv.block_table(request.request_id)
    planner = PlanBuilder()
    try:
        first = SchedulerOutput([ScheduledChunk(request, 0, prompt_len, table, True)])
        logits, _ = runner.forward_logits(planner.build(first))
        rows, picked = [logits[0].clone()], []
        for token in tokens[prompt_len:-1]:
            request.output_token_ids.append(token)
            chunk = ScheduledChunk(request, request.num_tokens - 1, 1, table, True)
            plan = planner.build(SchedulerOutput([chunk]))
            picked.append(int(runner.execute(plan).token_ids.item()))
            rows.append(runner.decode_graphs.graphs[1].logits[0].clone())
        return torch.stack(rows), picked
    finally:
        kv.free(request.request_id)
        runner.tables.apply(planner.build(SchedulerOutput(), kv.take_freed()))
