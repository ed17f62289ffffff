"""The sampler's random draw in one pass: counter-based noise and the exponential race fused.

`engine/sampler.py` draws token v of a row with probability softmax(logits)[v] by taking
argmax_v(logits[v] - log E_v), with E_v = -log u_v and u_v the uniform of (seed, step, v) from
`uniform_noise` (Gumbel-max; the same law as argmax p / E). In torch that is ~30 kernels over
[B, V] int64 and float tensors; here it is one pass that hashes, races and reduces per vocab
slice, then a tiny reduction over the slices. The hash is integer-exact, so the uniforms are
bit-identical to `uniform_noise`'s on every device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.device import sm_count
from engine.kernels.race_noise import race_key, race_step, race_winner, row_key
from engine.kernels.top_p import row_temperatures
from engine.kernels.top_p_split import _load_row

_BLOCK = 1024


@triton.jit
def _race_kernel(logits_ptr, temps_ptr, seeds_ptr, steps_ptr, thr_ptr, cut_ptr, skip_ptr,
                 best_key_ptr, best_idx_ptr, vocab_size, row_stride, per_split,
                 HAS_CUT: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    seed = tl.load(seeds_ptr + row)
    step = tl.load(steps_ptr + row)
    temp = tl.load(temps_ptr + row)
    if HAS_CUT:  # the top-p cut (engine/kernels/top_p.py), applied as the row is read
        thr = tl.load(thr_ptr + row)
        cut = tl.load(cut_ptr + row)
    key_of_row = row_key(seed, step)

    best_key = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], 2147483647, tl.int32)
    begin = split * per_split
    length = per_split
    if SKIP:  # a row already drawn (top_p_race.py): read nothing, its result is not used
        length = tl.where(tl.load(skip_ptr + row) != 0, 0, per_split)
    for start in range(begin, begin + length, BLOCK):
        v = start + tl.arange(0, BLOCK)
        mask = v < vocab_size
        logit = _load_row(logits_ptr + row * row_stride, v, mask, temp)  # torch's logits / T
        if HAS_CUT:  # kept: above the boundary logit, or at it up to the cut id (apply_cut)
            kept = (logit > thr) | ((logit == thr) & (v <= cut))
            logit = tl.where(kept, logit, float("-inf"))
        key = race_key(logit, key_of_row, v)
        best_key, best_idx = race_step(best_key, best_idx, key, v, mask)
    top, first = race_winner(best_key, best_idx, begin)  # all masked: its first id
    tl.store(best_key_ptr + row * num_splits + split, top)
    tl.store(best_idx_ptr + row * num_splits + split, first)


def sample_race(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                temperatures: torch.Tensor | None = None,
                skip: torch.Tensor | None = None) -> torch.Tensor:
    """argmax_v(logits[b, v] - log(-log u(seeds[b], steps[b], v))) per row: [B] int64.
    Ties pick the lowest id, as torch.argmax does. Masked (-inf) logits are never picked unless
    a whole row is masked. `temperatures` [B]: race on `logits / temperatures[:, None]`,
    divided as the row is read (no tempered copy). `bounds`: a top-p cut's (thr, cut)
    (`top_p.top_p_cut`, of the tempered rows); the race then reads the row as
    `top_p.apply_cut` would leave it, without that masked copy. `skip` [B] (nonzero: skip):
    rows not read at all, whose result is then meaningless (the caller has them already)."""
    batch, vocab = logits.shape
    logits = logits.float().contiguous()
    temps = row_temperatures(temperatures, batch, logits.device)
    splits = min(_num_splits(batch, logits.device), triton.cdiv(vocab, _BLOCK))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), _BLOCK) * _BLOCK
    splits = triton.cdiv(vocab, per_split)
    best_key = torch.empty(batch, splits, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(batch, splits, dtype=torch.int32, device=logits.device)
    thr, cut = bounds if bounds is not None else (best_key, best_idx)  # placeholders if none
    skips = skip if skip is not None else best_idx  # a placeholder if none
    _race_kernel[(batch, splits)](logits, temps, seeds, steps, thr, cut, skips, best_key,
                                  best_idx, vocab, logits.stride(0), per_split,
                                  HAS_CUT=bounds is not None, SKIP=skip is not None,
                                  BLOCK=_BLOCK, num_warps=4)
    # slices are in vocabulary order, so the first best slice holds the lowest best id
    return best_idx.gather(1, best_key.argmax(dim=1, keepdim=True)).squeeze(1).long()


def _num_splits(batch: int, device: torch.device) -> int:
    """About four programs per SM in all."""
    return max(1, 4 * sm_count(device) // batch)
