"""Speculative decoding's verification: which drafted tokens to keep, keeping the target's
distribution exactly.

A request verified with k drafted tokens d_0..d_{k-1} has k + 1 consecutive rows of target
logits: row j is the target's next-token distribution at output position n + j given the prefix
and d_0..d_{j-1}; row k (the *bonus* row) follows all drafts. Every row carries its own sampling
row (the request's options and seed, step = that output index, a token history that includes
the drafts before it), so p_j, the distribution row j's options give, is exactly what plain
decoding would draw from at that position had it drawn d_0..d_{j-1}.

- Point-mass drafts (n-gram): row j draws its token exactly as plain decoding would (the
  same sampler, options, seed and output index, so the same counter-based noise), and d_j is
  kept while it equals that draw; the token after the kept prefix is the draw at the first
  mismatch, or the bonus row's. The output is therefore plain decoding's, token for token,
  greedy or seeded — whatever was drafted, and whether a step drafted at all. (This keeps d_j
  with probability p_j(d_j), as rejection sampling with a point-mass q would.)
- Drafts sampled from a distribution q (a draft model): d_j is kept with probability
  min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn from the residual
  max(p_j - q_j, 0), renormalized; with every draft kept, the bonus token is drawn from p_k.
  Each emitted token is distributed exactly as p at its position (greedy rows: accept while
  the draft is the argmax).

Randomness stays counter-based (engine/sampler.py): the acceptance uniform of a row is a pure
function of (seed ^ salt, step), independent of the race noise the residual draw uses, so a
verification is reproducible in any batch. Everything is batched over rows; the host builds only
the small row index from the per-request draft counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.kernels import dispatch
from engine.sampler import (Sampler, SamplingTensors, apply_repetition_penalty,
                            sampling_logits, uniform_noise)

_ACCEPT_SALT = 0x5DEECE66D  # separates the acceptance uniforms from the race noise


@dataclass(slots=True)
class VerifyOutput:
    """Per request: the emitted tokens (kept drafts, then one more), padded with -1."""

    token_ids: Tensor  # [B, max_k + 1] int64
    num_emitted: Tensor  # [B] int64, kept drafts + 1
    logprobs: Tensor | None  # [B, max_k + 1] float32 under the raw logits, when asked


def row_layout(num_drafts: Sequence[int], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """(index [B, max_k + 1] of each request's rows in the flat batch, 0 where padded;
    is_draft [B, max_k + 1]: the position holds a drafted token)."""
    if not num_drafts or min(num_drafts) < 0:
        raise ValueError(f"num_drafts must be non-negative counts, got {list(num_drafts)}")
    counts = torch.tensor(num_drafts, dtype=torch.int64)
    starts = torch.cumsum(counts + 1, 0) - (counts + 1)
    positions = torch.arange(int(counts.max()) + 1)
    rows = starts[:, None] + positions[None, :]
    index = torch.where(positions[None, :] <= counts[:, None], rows, 0)
    is_draft = positions[None, :] < counts[:, None]
    return index.to(device), is_draft.to(device)


def verify(logits: Tensor, tensors: SamplingTensors, draft_ids: Tensor,
           num_drafts: Sequence[int], draft_probs: Tensor | None = None) -> VerifyOutput:
    """Keep each request's longest accepted draft prefix and emit one more token.

    `logits` [R, V] and `tensors` (R rows) hold every request's k_i + 1 rows back to back;
    `draft_ids` [R] is the drafted token each row scores (-1 on bonus rows); `draft_probs`
    [R, V] is q for a proposer that samples its drafts (None: point-mass drafts)."""
    rows, vocab = logits.shape
    if sum(k + 1 for k in num_drafts) != rows or draft_ids.shape != (rows,):
        raise ValueError(f"{rows} rows do not match drafts {list(num_drafts)} "
                         f"and draft_ids {list(draft_ids.shape)}")
    raw = logits.float()
    is_draft_row = draft_ids >= 0
    if draft_probs is None:  # point-mass drafts: the plain sampler's own draw at every row
        emit = Sampler()(raw, tensors).token_ids
        accept = (draft_ids == emit) & is_draft_row
    else:
        accept, emit = _rejection_sample(raw, tensors, draft_ids, draft_probs)
    index, is_draft = row_layout(num_drafts, logits.device)
    kept = torch.cumprod((accept[index] & is_draft).long(), dim=1).sum(dim=1)  # [B]
    positions = torch.arange(index.shape[1], device=logits.device)[None, :]
    tokens = torch.where(positions < kept[:, None], draft_ids[index], emit[index])
    tokens = tokens.masked_fill(positions > kept[:, None], -1)
    logprobs = None
    if tensors.need_logprobs:  # each row's token: its draft where kept, else what it emits
        row_token = torch.where(accept, draft_ids, emit)[:, None]
        flat = raw.log_softmax(dim=-1).gather(1, row_token).squeeze(1)
        logprobs = flat[index].masked_fill(tokens < 0, 0.0)
    return VerifyOutput(tokens, kept + 1, logprobs)


def _rejection_sample(raw: Tensor, tensors: SamplingTensors, draft_ids: Tensor,
                      draft_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Drafts sampled from q (a draft model): (accepted [R], token a row emits when its draft
    is not accepted [R]). Greedy rows accept while the draft is the argmax."""
    scored = raw
    if tensors.any_penalty:
        scored = apply_repetition_penalty(raw, tensors.seen_mask, tensors.repetition_penalties)
    greedy_pick = scored.argmax(dim=-1)
    if tensors.all_greedy:
        return draft_ids == greedy_pick, greedy_pick
    accept, emit = _speculative_sample(scored, tensors, draft_ids, draft_probs)
    return (torch.where(tensors.greedy_rows, draft_ids == greedy_pick, accept),
            torch.where(tensors.greedy_rows, greedy_pick, emit))


def _speculative_sample(scored: Tensor, tensors: SamplingTensors, draft_ids: Tensor,
                        draft_probs: Tensor) -> tuple[Tensor, Tensor]:
    """min(1, p/q) acceptance and the residual draw, for sampled rows."""
    target = sampling_logits(scored, tensors)
    probs = target.softmax(dim=-1)
    drafted = draft_ids.clamp(min=0)[:, None]
    ratio = probs.gather(1, drafted).squeeze(1)
    ratio = ratio / draft_probs.float().gather(1, drafted).squeeze(1).clamp(min=1e-30)
    residual = (probs - draft_probs.float()).clamp(min=0.0).log()
    is_draft_row = (draft_ids >= 0)[:, None]
    residual = torch.where(is_draft_row, residual, target)  # bonus rows draw from p itself
    uniforms = uniform_noise(tensors.seeds ^ _ACCEPT_SALT, tensors.steps, 1)[:, 0]
    # a residual with no mass left (p was all on the draft, up to rounding) keeps the draft
    nothing_left = torch.isneginf(residual).all(dim=-1)
    accepted = (uniforms < ratio) | nothing_left
    return accepted, dispatch.sample_race(residual, tensors.seeds, tensors.steps)


def draft_rows(plan) -> list[int]:
    """The drafted token each sampling row of a speculative `StepPlan` scores (-1 on each
    sequence's bonus row): a sequence's drafts are its last `spec_lens[i]` tokens."""
    ends = list(accumulate(plan.query_lens))
    sampling = [i for i, samples in enumerate(plan.samples) if samples]
    rows: list[int] = []
    for i, k in zip(sampling, plan.spec_lens):
        rows += plan.token_ids[ends[i] - k:ends[i]]
        rows.append(-1)
    return rows


def packed_positions(spec_lens: Sequence[int]) -> tuple[list[int], list[int]]:
    """(request, position) of each sampling row of a speculative plan: request i owns
    spec_lens[i] + 1 consecutive rows. Indexes `VerifyOutput` rows into the plan's rows."""
    seqs = [i for i, k in enumerate(spec_lens) for _ in range(k + 1)]
    positions = [j for k in spec_lens for j in range(k + 1)]
    return seqs, positions
