"""Sort-free top-p (nucleus) cut: the boundary of each row's nucleus without sorting the row.

The reference (`engine.sampler.apply_top_k_top_p`) sorts each row (stable, descending), keeps
the tokens whose probability mass *before* them is < top_p, and masks the rest. The kept set is
a prefix of the stable order, so it is fully described by two numbers per row:

    t   = the smallest kept logit, and
    cut = the largest kept token id among the tokens whose logit equals t
    kept(v)  <=>  x_v > t  or  (x_v == t and v <= cut).

This kernel finds (t, cut) with one program per row and no sort:
1. one pass for the row max m and S = sum exp(x - m) (online, as in softmax);
2. one pass that compacts the *candidates* x >= m + log(S (1 - p) / V) into a small buffer (in
   id order): the tokens below that bound together hold less than 1 - p of the mass, so the
   nucleus lies among the candidates. Usually a few dozen to a few hundred tokens; when more
   than `CAP` qualify (a flat row, or top_p very close to 1) the search runs over the whole row;
3. a bisection over float32 values for t = max{t : mass(x >= t) >= p}, one pass over the
   candidates per step, stopping when the interval is one ulp wide (64 steps at most);
4. one pass that counts the ties at t and picks the last kept one by id: the r-th tie (0-based,
   in id order) is kept while mass(x > t) + r * p_t < p.

Masses are summed in a different order than the reference's cumsum, so a token whose mass
before it lies within float rounding (~1e-7 relative) of top_p may fall on the other side;
everywhere else the kept set is the reference's exactly (tests check it on fresh random rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024
CAP = 2048  # candidates kept per row before the search falls back to the whole row
_MAX_STEPS = 64
_NEG_INF = float("-inf")


@triton.jit
def _mass_at_least(val_ptr, count, thr, m, BLOCK: tl.constexpr):
    """sum over the first `count` values of exp(x - m) where x >= thr."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        x = tl.load(val_ptr + i, mask=i < count, other=float("-inf"))
        acc += tl.where(x >= thr, tl.exp(x - m), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _top_p_cut_kernel(logits_ptr, top_ps_ptr, cand_val_ptr, cand_id_ptr, thr_ptr, cut_ptr,
                      vocab, row_stride, CAP: tl.constexpr, BLOCK: tl.constexpr,
                      MAX_STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p = tl.load(top_ps_ptr + row)
    row_ptr = logits_ptr + row * row_stride
    # 1. row max and sum of exp, online
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        v = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + v, mask=v < vocab, other=float("-inf"))
        new_m = tl.maximum(m_vec, x)
        scale = tl.exp(tl.where(m_vec == float("-inf"), float("-inf"), m_vec - new_m))
        term = tl.exp(tl.where(x == float("-inf"), float("-inf"), x - new_m))
        s_vec = s_vec * scale + term
        m_vec = new_m
    m = tl.max(m_vec, axis=0)
    s = tl.sum(s_vec * tl.exp(tl.where(m_vec == float("-inf"), float("-inf"), m_vec - m)), axis=0)
    target = p * s
    # 2. compact the candidates (id order) into this row's scratch
    bound = m + tl.log(s * (1.0 - p) / vocab) - 1e-3
    cand_val = cand_val_ptr + row * CAP
    cand_id = cand_id_ptr + row * CAP
    n = 0
    for start in range(0, vocab, BLOCK):
        v = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + v, mask=v < vocab, other=float("-inf"))
        keep = (v < vocab) & (x >= bound)
        pos = n + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(cand_val + pos, x, mask=keep & (pos < CAP))
        tl.store(cand_id + pos, v, mask=keep & (pos < CAP))
        n += tl.sum(keep.to(tl.int32), axis=0)
    # the search runs over the candidates, or over the whole row when they overflowed
    use_ids = n <= CAP
    if use_ids:
        vals = cand_val
        count = n
    else:
        vals = row_ptr
        count = vocab
    # 3. bisection: mass(x >= lo) >= target > mass(x >= hi)
    lo = bound
    hi = m
    top_mass = _mass_at_least(vals, count, m, m, BLOCK)
    if top_mass >= target:
        lo = m
    steps = 0
    mid = lo + (hi - lo) * 0.5
    while (steps < MAX_STEPS) & (mid > lo) & (mid < hi):
        if _mass_at_least(vals, count, mid, m, BLOCK) >= target:
            lo = mid
        else:
            hi = mid
        mid = lo + (hi - lo) * 0.5
        steps += 1
    # 4. t = the smallest value >= lo; ties at t kept in id order while mass stays < p
    t_vec = tl.full([BLOCK], float("inf"), tl.float32)
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        x = tl.load(vals + i, mask=i < count, other=float("-inf"))
        t_vec = tl.minimum(t_vec, tl.where(x >= lo, x, float("inf")))
    t = tl.min(t_vec, axis=0)
    gt_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        x = tl.load(vals + i, mask=i < count, other=float("-inf"))
        gt_vec += tl.where(x > t, tl.exp(x - m), 0.0)
    mass_gt = tl.sum(gt_vec, axis=0)
    p_t = tl.exp(t - m)
    # the r-th tie (0-based) is kept while mass_gt + r * p_t < target
    need = tl.maximum(tl.ceil((target - mass_gt) / p_t), 1.0).to(tl.int32)
    seen = 0
    cut = -1
    id_count = tl.where(use_ids, count, 0)  # candidates carry their ids; the whole row is i
    for start in range(0, count, BLOCK):
        i = start + tl.arange(0, BLOCK)
        x = tl.load(vals + i, mask=i < count, other=float("-inf"))
        tie = (i < count) & (x == t)
        ids = tl.load(cand_id + i, mask=i < id_count, other=0)
        ids = tl.where(use_ids, ids, i)
        rank = seen + tl.cumsum(tie.to(tl.int32), axis=0)
        cut = tl.maximum(cut, tl.max(tl.where(tie & (rank <= need), ids, -1), axis=0))
        seen += tl.sum(tie.to(tl.int32), axis=0)
    keep_all = p >= 1.0
    tl.store(thr_ptr + row, tl.where(keep_all, float("-inf"), t))
    tl.store(cut_ptr + row, tl.where(keep_all, vocab, cut))


def top_p_cut(logits: torch.Tensor, top_ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [B] float32, cut [B] int32) of each row's nucleus; rows with top_p >= 1 keep all
    (t = -inf, cut = vocab). `logits` is [B, V] float32 on CUDA (or the Triton interpreter)."""
    batch, vocab = logits.shape
    logits = logits.float().contiguous()
    top_ps = top_ps.float().contiguous()
    cand_val = torch.empty(batch, CAP, dtype=torch.float32, device=logits.device)
    cand_id = torch.empty(batch, CAP, dtype=torch.int32, device=logits.device)
    thr = torch.empty(batch, dtype=torch.float32, device=logits.device)
    cut = torch.empty(batch, dtype=torch.int32, device=logits.device)
    _top_p_cut_kernel[(batch,)](logits, top_ps, cand_val, cand_id, thr, cut, vocab,
                                logits.stride(0), CAP=CAP, BLOCK=_BLOCK, MAX_STEPS=_MAX_STEPS,
                                num_warps=8)
    return thr, cut


def apply_cut(logits: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) every token outside the kept set that (thr, cut) describe."""
    ids = torch.arange(logits.shape[-1], device=logits.device)
    t = thr[:, None]
    kept = (logits > t) | ((logits == t) & (ids[None, :] <= cut[:, None]))
    return logits.masked_fill(~kept, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """The nucleus mask of `engine.sampler.apply_top_p`, without a sort."""
    thr, cut = top_p_cut(logits, top_ps)
    return apply_cut(logits.float(), thr, cut)
