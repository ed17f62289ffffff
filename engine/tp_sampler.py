"""Sampling from vocabulary slices: every tensor rank draws the ids `Sampler` would draw from the
whole vocabulary's logits, without gathering those logits where the step's options allow.

A tensor-parallel LM head can leave each rank its contiguous vocab slice (`ParallelLMHead` with
`gather_logits=False`: [rows, vocab_per_rank], columns past the vocabulary at -inf).
`sample_vocab_parallel` then takes one of two paths per step, from the plan's sampling rows:

- **no gather**: rows that are greedy or sample with a temperature, with or without repetition
  penalty, top-k up to `MAX_SLICED_TOP_K`, min-p and logprobs. Each rank computes its columns'
  keys exactly as `Sampler` computes the same columns of the whole row (penalty from the history
  ids inside the slice, temperature, the race's noise hashed from the *global* token ids:
  `race_keys(..., first_id)`), takes its slice's argmax, and one all-gather of a few numbers per
  row and rank (best key, its global id; with logprobs also the slice's max raw logit, its sum
  of exp and the raw logit at its best) lets every rank pick the same winner. The first rank
  holding the greatest key wins, and its argmax is its lowest id of that key, so the winner is
  the lowest global id of the greatest key: torch.argmax on the whole row (NaN counting as the
  greatest, as there). Top-k adds one all-gather of every slice's k best (value, id) pairs,
  min-p one all-reduce max of each row's max. Logprobs combine per-slice log-sum-exps: equal
  to the one-rank `log_softmax` up to float32 summation order (about 1e-6).
- **gather** (any sampled row with top-p < 1, or a top-k above `MAX_SLICED_TOP_K`): the
  nucleus needs the whole sorted distribution, so the slices are all-gathered
  (`all_gather_last_dim`) and `Sampler` runs on the full logits, as with a gathering head.

Per row the result is the same token either way: the keys of every column are the same floats,
so only the order of comparisons differs, and the reduction keeps torch.argmax's tie rule.
On CUDA the one-rank draw is the fused Triton race (`engine/kernels/sampling.py`, same noise
bits, its own `log`), while slices use torch ops: like CUDA against CPU, ids agree unless two
keys are within an ulp.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from engine.layers.embedding import vocab_slice
from engine.parallel import ParallelContext
from engine.plan import SamplingRow
from engine.sampler import (Sampler, SamplerOutput, SamplingTensors, apply_min_p,
                            apply_repetition_penalty, race_keys)

MAX_SLICED_TOP_K = 1024  # a larger top-k gathers the logits rather than k candidates per slice


def needs_full_vocab(rows: Sequence[SamplingRow], vocab_size: int) -> bool:
    """Whether some sampled row needs the whole row's logits on every rank: top-p (the nucleus
    is a prefix of the globally sorted distribution) or a top-k too large to gather as
    candidates. Greedy rows never do: their options past the penalty are not used."""
    return any(not r.is_greedy and (r.top_p < 1.0 or MAX_SLICED_TOP_K < r.top_k < vocab_size)
               for r in rows)


def sample_vocab_parallel(local_logits: Tensor, rows: Sequence[SamplingRow], vocab_size: int,
                          parallel: ParallelContext) -> SamplerOutput:
    """The ids (and logprobs) `Sampler` draws from the whole vocabulary's logits, computed from
    this rank's slice `local_logits` ([B, vocab_per_rank]). Every tensor rank of the stage calls
    it with the same rows and meets the others in the same collectives."""
    first, width = vocab_slice(vocab_size, parallel.tp_rank, parallel.tp_size)
    if local_logits.dim() != 2 or local_logits.shape[1] != width:
        raise ValueError(f"a vocab slice of rank {parallel.tp_rank} must be [B, {width}], got "
                         f"{list(local_logits.shape)}")
    device = local_logits.device
    if needs_full_vocab(rows, vocab_size):
        full = parallel.all_gather_last_dim(local_logits)[:, :vocab_size]
        return Sampler()(full, SamplingTensors.from_rows(rows, vocab_size, device))
    tensors = SamplingTensors.from_rows(rows, vocab_size, device, vocab_window=(first, width))
    raw = local_logits.float()
    logits = raw
    if tensors.any_penalty:
        logits = apply_repetition_penalty(logits, tensors.seen_mask, tensors.repetition_penalties)
    keys = logits  # greedy rows race on their (penalized) logits
    if not tensors.all_greedy:
        drawn = _draw_keys(logits, tensors, _top_k_width(rows, vocab_size, width), first,
                           parallel)
        keys = torch.where(tensors.greedy_rows[:, None], logits, drawn)
    return _pick_winner(keys, raw if tensors.need_logprobs else None, first, parallel)


def _top_k_width(rows: Sequence[SamplingRow], vocab_size: int, width: int) -> int:
    """How many candidates each slice contributes to the top-k: the largest k of a sampled
    row (decided on the host from the plan, so no device value is read), at most the slice."""
    ks = [r.top_k for r in rows if not r.is_greedy and 0 < r.top_k < vocab_size]
    return min(max(ks), width) if ks else 0


def _draw_keys(logits: Tensor, tensors: SamplingTensors, top_k_width: int, first: int,
               parallel: ParallelContext) -> Tensor:
    """The slice's race keys, as `sampler._sample` computes those columns: temperature, top-k,
    min-p, then logits - log E with E from the global ids."""
    logits = logits / tensors.temperatures[:, None]
    if tensors.any_top_k:
        logits = _mask_top_k(logits, tensors.top_ks, top_k_width, first, tensors.vocab_size,
                             parallel)
    if tensors.any_min_p:
        row_max = parallel.all_reduce_max(logits.amax(dim=-1, keepdim=True))
        logits = apply_min_p(logits, tensors.min_ps, row_max)
    return race_keys(logits, tensors.seeds, tensors.steps, first)


def _mask_top_k(logits: Tensor, top_ks: Tensor, k: int, first: int, vocab_size: int,
                parallel: ParallelContext) -> Tensor:
    """Mask (to -inf) every column outside its row's top-k of the whole row, as `apply_top_k`
    does: order by value, ties by lower id, keep the first top_k. Each slice's first k in that
    order hold the whole row's first k, so one all-gather of k (value, id) pairs per row and rank
    gives every rank the k-th pair; a column is kept iff it does not come after it."""
    batch = logits.shape[0]
    values, order = logits.sort(dim=-1, descending=True, stable=True)
    mine = torch.stack([values[:, :k].double(), (order[:, :k] + first).double()])  # [2, B, k]
    every = parallel.all_gather_stacked(mine)  # [tp, 2, B, k], rank-major = id order on ties
    cand_values = every[:, 0].permute(1, 0, 2).reshape(batch, -1)
    cand_ids = every[:, 1].permute(1, 0, 2).reshape(batch, -1)
    ranked, position = cand_values.sort(dim=-1, descending=True, stable=True)
    kth = (top_ks.clamp(max=cand_values.shape[1]) - 1)[:, None]
    kth_value = ranked.gather(1, kth).float()
    kth_id = cand_ids.gather(1, position.gather(1, kth))
    ids = torch.arange(first, first + logits.shape[1], device=logits.device, dtype=torch.float64)
    keep = (logits > kth_value) | ((logits == kth_value) & (ids[None, :] <= kth_id))
    keep |= (top_ks >= vocab_size)[:, None]  # rows without top-k hold vocab_size
    return logits.masked_fill(~keep, -torch.inf)


def _pick_winner(keys: Tensor, raw: Tensor | None, first: int,
                 parallel: ParallelContext) -> SamplerOutput:
    """Each slice's argmax, then the same winner on every rank from one all-gather: the first
    rank of the greatest key (torch.argmax over ranks), i.e. the lowest global id. With `raw`
    the winner's logprob: raw logit - log-sum-exp of the whole row from per-slice parts."""
    best = keys.argmax(dim=-1, keepdim=True)
    columns = [keys.gather(1, best), best + first]
    if raw is not None:
        slice_max = raw.amax(dim=-1, keepdim=True)
        shift = torch.where(slice_max.isfinite(), slice_max, torch.zeros_like(slice_max))
        columns += [slice_max, (raw - shift).exp().sum(dim=-1, keepdim=True),
                    raw.gather(1, best)]
    every = parallel.all_gather_stacked(torch.cat([c.double() for c in columns], dim=1))
    winner = every[:, :, 0].argmax(dim=0)  # [B]: rank of each row's winning token
    chosen = every.gather(0, winner[None, :, None].expand(1, *every.shape[1:])).squeeze(0)
    logprobs = None
    if raw is not None:
        maxes, sums = every[:, :, 2], every[:, :, 3]
        row_max = maxes.amax(dim=0)
        scale = torch.where(maxes.isfinite(), (maxes - row_max).exp(), torch.zeros_like(maxes))
        logsumexp = row_max + (sums * scale).sum(dim=0).log()
        logprobs = (chosen[:, 4] - logsumexp).float()
    return SamplerOutput(token_ids=chosen[:, 1].long(), logprobs=logprobs)
