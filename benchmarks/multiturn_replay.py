"""Replaying a multi-turn chat workload (benchmarks/multiturn_workload.py) against anything that
streams token ids: the 2P+2D CPU cluster through the gRPC client (serving_multiturn.py) and one
colocated engine in process on a GPU (multiturn_gpu.py) share this, so both build the same
prompts and count the same way.

Every conversation runs its turns in order, all conversations at once. Each prompt is the system
prompt + every earlier user turn and the answer the server actually gave + the new user turn
(greedy, `ignore_eos`, each answer `max_tokens` long). A run's token ids are shifted by a
run-specific offset (`shifted`): a later run finds none of an earlier run's blocks in a prefix
cache, while every length and every prefix shared inside the run stay the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.multiturn_workload import FIRST_TOKEN_ID, Conversation, Workload

SHIFT = 7919  # token id offset between runs (prime: shifted prompts share nothing)

# (prompt token ids, max_tokens) -> the new token ids of each streamed event, greedy, ignore_eos
StreamFn = Callable[[list[int], int], AsyncIterator[list[int]]]


@dataclass(frozen=True, slots=True)
class TurnResult:
    """One request of a replay, timed on the client side."""

    conversation: int  # index in the workload
    turn: int  # index in its conversation
    prompt_tokens: int
    ttft_s: float  # request sent until its first token arrived
    e2e_s: float  # request sent until its last token arrived
    answer_token_ids: tuple[int, ...]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None for a one-token answer."""
        n = len(self.answer_token_ids)
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else None


def shifted(ids: Sequence[int], run: int, vocab_size: int) -> list[int]:
    """`ids` moved by `run * SHIFT` inside [FIRST_TOKEN_ID, vocab_size)."""
    span = vocab_size - FIRST_TOKEN_ID
    return [FIRST_TOKEN_ID + (t - FIRST_TOKEN_ID + run * SHIFT) % span for t in ids]


async def replay(stream: StreamFn, workload: Workload, run: int) -> list[TurnResult]:
    """Every turn of every conversation through `stream`, with run `run`'s shift; results in
    (conversation, turn) order. Raises what a stream raises (the caller bounds the time)."""
    system = shifted(workload.system_token_ids, run, workload.vocab_size)

    async def conversation(index: int, conv: Conversation) -> list[TurnResult]:
        history, out = list(system), []
        for turn_index, turn in enumerate(conv.turns):
            prompt = history + shifted(turn.user_token_ids, run, workload.vocab_size)
            result = await _one_turn(stream, prompt, turn.max_tokens, index, turn_index)
            out.append(result)
            history = prompt + list(result.answer_token_ids)
        return out

    results = await asyncio.gather(*(conversation(i, c)
                                     for i, c in enumerate(workload.conversations)))
    return [r for conv in results for r in conv]


async def _one_turn(stream: StreamFn, prompt: list[int], max_tokens: int, conversation: int,
                    turn: int) -> TurnResult:
    start_s, ttft_s, answer = time.perf_counter(), None, []
    async for token_ids in stream(prompt, max_tokens):
        if token_ids and ttft_s is None:
            ttft_s = time.perf_counter() - start_s
        answer += token_ids
    if ttft_s is None:
        raise RuntimeError(f"conversation {conversation} turn {turn}: the stream ended with no "
                           "token")
    return TurnResult(conversation, turn, len(prompt), ttft_s, time.perf_counter() - start_s,
                      tuple(answer))


def summarize(turns: Sequence[TurnResult], prefix_hit_tokens: int) -> dict:
    """Latency percentiles over every turn and the prefill work: prompt tokens sent, prefill
    tokens computed (sent minus the server's prefix-cache hits) and the hit rate."""
    ttfts_ms = np.array([t.ttft_s * 1e3 for t in turns])
    tpots_ms = np.array([t.tpot_s * 1e3 for t in turns if t.tpot_s is not None])
    prompt_tokens = sum(t.prompt_tokens for t in turns)
    return {"requests": len(turns),
            "ttft_p50_ms": round(float(np.median(ttfts_ms)), 1),
            "ttft_p99_ms": round(float(np.percentile(ttfts_ms, 99)), 1),
            "ttft_mean_ms": round(float(ttfts_ms.mean()), 1),
            # p50 by turn index: the first turn of each conversation is a cold prompt, later
            # ones resend the history (where a prefix cache hits)
            "ttft_p50_ms_by_turn": [round(float(np.median([t.ttft_s * 1e3 for t in turns
                                                           if t.turn == i])), 1)
                                    for i in range(max((t.turn for t in turns), default=-1) + 1)],
            "tpot_p50_ms": round(float(np.median(tpots_ms)), 2) if tpots_ms.size else None,
            "prompt_tokens": prompt_tokens,
            "prefill_tokens_computed": int(prompt_tokens - prefix_hit_tokens),
            "prefix_hit_tokens": int(prefix_hit_tokens),
            "hit_rate": round(prefix_hit_tokens / prompt_tokens, 4) if prompt_tokens else 0.0}
