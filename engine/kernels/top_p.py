"""Sort-free top-p (nucleus) cut: the boundary of each row's nucleus without sorting the row.

The reference (`engine.sampler.apply_top_k_top_p`) sorts each row (stable, descending), keeps
the tokens whose probability mass *before* them is < top_p, and masks the rest. The kept set is
a prefix of the stable order, so it is fully described by two numbers per row:

    t   = the smallest kept logit, and
    cut = the largest kept token id among the tokens whose logit equals t
    kept(v)  <=>  x_v > t  or  (x_v == t and v <= cut).

This kernel finds (t, cut) with one program per row (after a split first pass) and no sort.
It searches over *keys*: the float32 bits of a logit as an int32, with the low 31 bits flipped
for negatives (and -0 mapped to +0), so that key order is float order and equal keys are equal
floats.
1. the row max m and S = sum exp(x - m) (online, as in softmax), split over programs of
   `_STATS_CHUNK` tokens (`_row_stats_kernel`) and merged by the row's program;
2. one pass that compacts the *candidates* x >= m + log(S (1 - p) / V) into a per-row buffer
   (key, exp(x - m), id; in id order): the tokens below that bound together hold less than
   1 - p of the mass, so the nucleus lies among the candidates. When more than `CAP` qualify
   (a flat row: random weights, a high temperature; or top_p close to 1) the search of step 3
   first runs over the whole row (`_narrow_row`), also counting the tokens at/above each
   threshold, until the tokens *inside* its key interval [lo, hi) fit the buffer (the first
   such pass splits the candidates' value range evenly, the rest the key interval); the mass
   at/above hi is carried as one number (and the smallest key there), the interval's tokens
   are compacted and the search goes on over the buffer. A flat 128k row (randn * 0.02, p 0.9)
   takes 1 such pass: 3 whole-row passes in all (compact, narrow, compact) instead of 12.
   Only a row with more than `CAP` tokens tied at the boundary logit is cut over the whole row;
3. a k-ary search for K = max{k : mass(key >= k) >= p S}: each pass evaluates the mass at/above
   `_NT` thresholds at once ([NT, BLOCK] compare, each exp(x - m) loaded or computed once per
   element), shrinking the key interval (NT + 1)-fold: at most 8 passes for 2^32 keys (NT = 16),
   about 6 for a typical candidate range. Over the buffer each pass also compacts it in place to
   the tokens inside the current interval (the mass above it is carried as one number), so the
   passes after the first read a few hundred tokens instead of all candidates;
4. t = the smallest logit with key >= K, then one pass that counts the ties at t and picks the
   last kept one by id: the r-th tie (0-based, in id order) is kept while mass(x > t) + r p_t < p.

Masses are summed in a different order than the reference's cumsum, so a token whose mass
before it lies within float rounding (~1e-7 relative) of top_p may fall on the other side;
everywhere else the kept set is the reference's exactly (tests check it on fresh random rows).
Scratch per row: min(CAP, V) * 12 bytes (int32 key, float32 exp, int32 id: 192 KiB at CAP
16384) plus 8 bytes per max/sum split (128 B at V = 128256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ROW_BLOCK = 1024  # block of the full-row passes (max/sum, compaction)
_STATS_CHUNK = 8192  # tokens per program of the split max/sum pass (16 programs a 128k row)
_BLOCK = 512  # search passes: an [NT, BLOCK] fp32 tile, 32 per thread at 8 warps (sm_90 AOT:
# 174 registers with Triton 3.9, no spills)
_NT = 16  # thresholds per search pass: the key interval shrinks 17-fold per pass
_WARPS = 8
CAP = 16384  # candidate slots per row; beyond them the search narrows over the whole row first
_NEG_INF = float("-inf")
_KEY_MIN = tl.constexpr(-2147483648)
_KEY_MAX = tl.constexpr(2147483647)


@triton.jit
def _key(x):
    """Order-preserving int32 key of float32 x (-0 and +0 share key 0)."""
    b = x.to(tl.int32, bitcast=True)
    k = b ^ ((b >> 31) & 0x7FFFFFFF)
    return tl.where(x == 0.0, 0, k)


@triton.jit
def _value(k):
    """The float32 whose key is k (the inverse of `_key`)."""
    b = k ^ ((k >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _chunk(src_ptr, e_ptr, id_ptr, start, count, m, FROM_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """(key, exp(x - m), id, valid) of elements [start, start + BLOCK) of the searched set:
    the row's logits (FROM_ROW) or the candidate buffer (src_ptr = keys)."""
    i = start + tl.arange(0, BLOCK)
    valid = i < count
    if FROM_ROW:
        x = tl.load(src_ptr + i, mask=valid, other=float("-inf"))
        k = _key(x)
        e = tl.exp(x - m)
        ids = i
    else:
        k = tl.load(src_ptr + i, mask=valid, other=0)
        e = tl.load(e_ptr + i, mask=valid, other=0.0)
        ids = tl.load(id_ptr + i, mask=valid, other=0)
    return tl.where(valid, k, _KEY_MIN), tl.where(valid, e, 0.0), ids, valid


@triton.jit
def _narrow_row(row_ptr, vocab, m, lo, hi, target, n, cap, NT: tl.constexpr,
                BLOCK: tl.constexpr):
    """k-ary passes over the whole row on [lo, hi) (int64 keys; mass(>= lo) >= target >
    mass(>= hi)) until the tokens *inside* [lo, hi) fit the buffer or the interval is one key
    wide. n: #(key >= lo) on entry. Returns (lo, hi, #(lo <= key < hi), mass(key >= hi)): the
    mass at/above hi is one of this function's own sums (the same order for every threshold,
    so it agrees with the passes' decisions).
    The first pass spaces its thresholds evenly in *value* between the logits at lo and hi - 1
    (lo: the smallest candidate key): a flat row's logits span a few binades around 0, a
    sliver of the key range, while 17 value buckets split them into comparable parts (one pass
    instead of 3 for randn * 0.02 at p 0.9). The later passes split the key interval evenly (17-fold each,
    so the loop stays bounded by 1 + 8 passes)."""
    j = (tl.arange(0, NT) + 1).to(tl.int64)
    frac = j.to(tl.float32) / (NT + 1)
    n_hi = 0  # #(key >= hi)
    mass_hi = tl.zeros((), tl.float32)
    by_value = tl.full((), 1, tl.int32)  # the first pass
    while (hi - lo > 1) & (n - n_hi > cap):
        step = (hi - lo + NT) // (NT + 1)
        a = _value(lo.to(tl.int32))
        b = _value((hi - 1).to(tl.int32))
        thr_value = tl.minimum(tl.maximum(_key(a + (b - a) * frac).to(tl.int64), lo + 1), hi)
        thr = tl.where(by_value != 0, thr_value, tl.minimum(lo + j * step, hi))
        by_value = by_value * 0
        thr = thr.to(tl.int32)
        acc = tl.zeros([NT, BLOCK], tl.float32)
        num = tl.zeros([NT, BLOCK], tl.int32)
        for start in range(0, vocab, BLOCK):
            k, e, ids, valid = _chunk(row_ptr, row_ptr, row_ptr, start, vocab, m, True, BLOCK)
            at_least = k[None, :] >= thr[:, None]
            acc += tl.where(at_least, e[None, :], 0.0)
            num += at_least.to(tl.int32)
        # masses are monotone in the threshold (nested sums in one order): count the passing;
        # a threshold clamped to hi is known to fail (rounding in this pass may disagree)
        mass = tl.sum(acc, axis=1)
        count = tl.sum(num, axis=1)
        passing = (mass >= target) & (thr < hi)
        above = tl.sum(passing.to(tl.int64), axis=0)
        n = tl.where(above > 0, tl.sum(tl.where(j == above, count, 0), axis=0), n)
        # thresholds ascend: lo moves to the last passing one, hi to the first failing one
        new_hi = j == above + 1
        n_hi = tl.where(above < NT, tl.sum(tl.where(new_hi, count, 0), axis=0), n_hi)
        mass_hi = tl.where(above < NT, tl.sum(tl.where(new_hi, mass, 0.0), axis=0), mass_hi)
        lo = tl.maximum(lo, tl.max(tl.where(passing, thr, lo), axis=0))
        hi = tl.minimum(hi, tl.min(tl.where(passing, hi, thr), axis=0))
    return lo, hi, n - n_hi, mass_hi


@triton.jit
def _search_buffer(key_ptr, e_ptr, id_ptr, n, m, lo, hi, target, mass_hi, min_above,
                   NT: tl.constexpr, BLOCK: tl.constexpr):
    """k-ary passes over the candidate buffer on [lo, hi), each also compacting the buffer in
    place to the tokens inside [lo, hi): those below can no longer matter, the mass of those
    at/above hi is carried as `mass_hi` (and their smallest key as `min_above`; both start
    from those of the tokens above the buffer, 0 and _KEY_MAX when there are none). Returns
    (lo, n, mass_hi, min_above) with the buffer holding the tokens of the last pass's interval,
    which contains the key lo the search stopped at."""
    j = (tl.arange(0, NT) + 1).to(tl.int64)
    while hi - lo > 1:
        step = (hi - lo + NT) // (NT + 1)
        thr = tl.minimum(lo + j * step, hi).to(tl.int32)
        lo32 = lo.to(tl.int32)
        hi32 = hi.to(tl.int32)
        acc = tl.zeros([NT, BLOCK], tl.float32)
        high_vec = tl.zeros([BLOCK], tl.float32)
        min_vec = tl.full([BLOCK], _KEY_MAX, tl.int32)
        kept = 0
        for start in range(0, n, BLOCK):
            k, e, ids, valid = _chunk(key_ptr, e_ptr, id_ptr, start, n, m, False, BLOCK)
            tl.debug_barrier()  # every warp holds this block before any slot of it is rewritten
            high = valid & (k >= hi32)
            inside = valid & (k >= lo32) & (k < hi32)
            high_vec += tl.where(high, e, 0.0)
            min_vec = tl.minimum(min_vec, tl.where(high, k, _KEY_MAX))
            acc += tl.where(k[None, :] >= thr[:, None], tl.where(inside, e, 0.0)[None, :], 0.0)
            pos = kept + tl.cumsum(inside.to(tl.int32), axis=0) - 1
            tl.store(key_ptr + pos, k, mask=inside)
            tl.store(e_ptr + pos, e, mask=inside)
            tl.store(id_ptr + pos, ids, mask=inside)
            kept += tl.sum(inside.to(tl.int32), axis=0)
        tl.debug_barrier()  # the compacted buffer is visible to every warp of the next pass
        mass_hi += tl.sum(high_vec, axis=0)
        min_above = tl.minimum(min_above, tl.min(min_vec, axis=0))
        n = kept
        # masses are monotone in the threshold (nested sums in one order): count the passing;
        # a threshold clamped to hi is known to fail (rounding in this pass may disagree)
        passing = (mass_hi + tl.sum(acc, axis=1) >= target) & (thr < hi)
        above = tl.sum(passing.to(tl.int64), axis=0)
        lo = lo + above * step
        hi = tl.minimum(hi, lo + step)
    return lo, n, mass_hi, min_above


@triton.jit
def _compact(row_ptr, vocab, m, lo, hi, cand_key, cand_e, cand_id, cap, ROW_BLOCK: tl.constexpr):
    """Store (key, exp(x - m), id) of the tokens with lo <= key < hi (int64 bounds), in id
    order, while they fit in the buffer; returns how many there are (stored or not), the
    smallest of their keys and the smallest key >= hi (_KEY_MAX if none)."""
    n = 0
    min_vec = tl.full([ROW_BLOCK], _KEY_MAX, tl.int32)
    min_kept = tl.full([ROW_BLOCK], _KEY_MAX, tl.int32)
    for start in range(0, vocab, ROW_BLOCK):
        v = start + tl.arange(0, ROW_BLOCK)
        x = tl.load(row_ptr + v, mask=v < vocab, other=float("-inf"))
        k = _key(x)
        keep = (v < vocab) & (k >= lo) & (k < hi)
        min_vec = tl.minimum(min_vec, tl.where((v < vocab) & (k >= hi), k, _KEY_MAX))
        min_kept = tl.minimum(min_kept, tl.where(keep, k, _KEY_MAX))
        pos = n + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        fits = keep & (pos < cap)
        tl.store(cand_key + pos, k, mask=fits)
        tl.store(cand_e + pos, tl.exp(x - m), mask=fits)
        tl.store(cand_id + pos, v, mask=fits)
        n += tl.sum(keep.to(tl.int32), axis=0)
    tl.debug_barrier()  # the buffer is visible to every warp of the search
    return n, tl.min(min_kept, axis=0), tl.min(min_vec, axis=0)


@triton.jit
def _cut(src_ptr, e_ptr, id_ptr, count, m, lo, target, mass_hi, min_above,
         FROM_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """(t, cut) once the search stopped at key lo: t = smallest logit with key >= lo; the ties
    at t are kept in id order while the mass before them stays below target. `mass_hi` and
    `min_above`: mass and smallest key of the tokens above the searched set (see
    `_search_buffer`); if none of its tokens is >= lo (only when rounding made the search's
    masses disagree), every token from min_above up is kept."""
    t_vec = tl.full([BLOCK], _KEY_MAX, tl.int32)
    for start in range(0, count, BLOCK):
        k, e, ids, valid = _chunk(src_ptr, e_ptr, id_ptr, start, count, m, FROM_ROW, BLOCK)
        t_vec = tl.minimum(t_vec, tl.where(k >= lo, k, _KEY_MAX))
    t_key = tl.min(t_vec, axis=0)
    none_inside = t_key == _KEY_MAX
    t_key = tl.minimum(t_key, min_above)
    gt_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        k, e, ids, valid = _chunk(src_ptr, e_ptr, id_ptr, start, count, m, FROM_ROW, BLOCK)
        gt_vec += tl.where(k > t_key, e, 0.0)
    mass_gt = mass_hi + tl.sum(gt_vec, axis=0)
    t = _value(t_key)
    p_t = tl.exp(t - m)
    # the r-th tie (0-based) is kept while mass_gt + r * p_t < target
    need = tl.maximum(tl.ceil((target - mass_gt) / p_t), 1.0).to(tl.int32)
    seen = 0
    cut = -1
    for start in range(0, count, BLOCK):
        k, e, ids, valid = _chunk(src_ptr, e_ptr, id_ptr, start, count, m, FROM_ROW, BLOCK)
        tie = valid & (k == t_key)
        rank = seen + tl.cumsum(tie.to(tl.int32), axis=0)
        cut = tl.maximum(cut, tl.max(tl.where(tie & (rank <= need), ids, -1), axis=0))
        seen += tl.sum(tie.to(tl.int32), axis=0)
    return t, tl.where(none_inside, _KEY_MAX, cut)


@triton.jit
def _row_stats_kernel(logits_ptr, stats_ptr, vocab, row_stride, chunk, SPLITS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Step 1, split: program (row, j) writes the max m_j and sum exp(x - m_j) of its `chunk`
    of the row (online, as in softmax) to stats[row, j] (m) and stats[row, SPLITS + j] (s)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * row_stride
    end = tl.minimum(split * chunk + chunk, vocab)
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(split * chunk, end, BLOCK):
        v = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + v, mask=v < end, other=float("-inf"))
        new_m = tl.maximum(m_vec, x)
        scale = tl.exp(tl.where(m_vec == float("-inf"), float("-inf"), m_vec - new_m))
        term = tl.exp(tl.where(x == float("-inf"), float("-inf"), x - new_m))
        s_vec = s_vec * scale + term
        m_vec = new_m
    m, s = _merge_max_sum(m_vec, s_vec)
    tl.store(stats_ptr + row * 2 * SPLITS + split, m)
    tl.store(stats_ptr + row * 2 * SPLITS + SPLITS + split, s)


@triton.jit
def _merge_max_sum(m_vec, s_vec):
    """(max, sum exp(x - max)) from partial maxima and sums (partial max -inf: empty)."""
    m = tl.max(m_vec, axis=0)
    scale = tl.exp(tl.where(m_vec == float("-inf"), float("-inf"), m_vec - m))
    return m, tl.sum(tl.where(m_vec == float("-inf"), 0.0, s_vec * scale), axis=0)


@triton.jit
def _top_p_cut_kernel(logits_ptr, top_ps_ptr, stats_ptr, cand_key_ptr, cand_e_ptr, cand_id_ptr,
                      thr_ptr, cut_ptr, vocab, row_stride, cap, num_splits,
                      SPLITS: tl.constexpr, ROW_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                      NT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p = tl.load(top_ps_ptr + row)
    row_ptr = logits_ptr + row * row_stride
    # 1. row max and sum of exp, from the split partials of `_row_stats_kernel`
    j = tl.arange(0, SPLITS)
    m_part = tl.load(stats_ptr + row * 2 * SPLITS + j, mask=j < num_splits, other=float("-inf"))
    s_part = tl.load(stats_ptr + row * 2 * SPLITS + SPLITS + j, mask=j < num_splits, other=0.0)
    m, s = _merge_max_sum(m_part, s_part)
    target = p * s
    t = tl.full((), float("-inf"), tl.float32)  # top_p >= 1: keep the whole row
    cut = vocab
    if p < 1.0:
        # 2. compact the candidates (id order) into this row's scratch
        bound = m + tl.log(s * (1.0 - p) / vocab) - 1e-3
        lo = _key(bound).to(tl.int64)
        hi = _key(m).to(tl.int64) + 1
        cand_key = cand_key_ptr + row * cap
        cand_e = cand_e_ptr + row * cap
        cand_id = cand_id_ptr + row * cap
        everything = tl.full((), _KEY_MAX, tl.int64) + 1  # above every key
        n, min_kept, min_above = _compact(row_ptr, vocab, m, lo, everything, cand_key, cand_e,
                                          cand_id, cap, ROW_BLOCK)
        mass_hi = tl.zeros((), tl.float32)
        if n > cap:  # overflow: narrow over the whole row until the keys in [lo, hi) fit
            lo = tl.maximum(lo, min_kept.to(tl.int64))  # no key in between: the same mass
            lo, hi, n, mass_hi = _narrow_row(row_ptr, vocab, m, lo, hi, target, n, cap, NT,
                                             BLOCK)
            if n <= cap:
                n, min_kept, min_above = _compact(row_ptr, vocab, m, lo, hi, cand_key, cand_e,
                                                  cand_id, cap, ROW_BLOCK)
        # 3-4. over the candidates, or (more than CAP ties at one key) over the whole row
        if n <= cap:
            lo, n, mass_hi, min_above = _search_buffer(cand_key, cand_e, cand_id, n, m, lo, hi,
                                                       target, mass_hi, min_above, NT, BLOCK)
            t, cut = _cut(cand_key, cand_e, cand_id, n, m, lo, target, mass_hi, min_above,
                          False, BLOCK)
        else:
            t, cut = _cut(row_ptr, row_ptr, row_ptr, vocab, m, lo, target, 0.0, _KEY_MAX, True,
                          BLOCK)
    tl.store(thr_ptr + row, t)
    tl.store(cut_ptr + row, cut)


def top_p_cut(logits: torch.Tensor, top_ps: torch.Tensor,
              cap: int = CAP) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [B] float32, cut [B] int32) of each row's nucleus; rows with top_p >= 1 keep all
    (t = -inf, cut = vocab). `logits` is [B, V] float32 on CUDA (or the Triton interpreter).
    `cap`: candidate slots per row (tests shrink it to reach the overflow path at small V)."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    batch, vocab = logits.shape
    logits = logits.float().contiguous()
    top_ps = top_ps.float().contiguous()
    cap = min(cap, vocab)
    num_splits = triton.cdiv(vocab, _STATS_CHUNK)
    splits = triton.next_power_of_2(num_splits)
    dev = logits.device
    stats = torch.empty(batch, 2 * splits, dtype=torch.float32, device=dev)
    cand_key = torch.empty(batch, cap, dtype=torch.int32, device=dev)
    cand_e = torch.empty(batch, cap, dtype=torch.float32, device=dev)
    cand_id = torch.empty(batch, cap, dtype=torch.int32, device=dev)
    thr = torch.empty(batch, dtype=torch.float32, device=dev)
    cut = torch.empty(batch, dtype=torch.int32, device=dev)
    _row_stats_kernel[(batch, num_splits)](logits, stats, vocab, logits.stride(0), _STATS_CHUNK,
                                           SPLITS=splits, BLOCK=_ROW_BLOCK, num_warps=4)
    _top_p_cut_kernel[(batch,)](logits, top_ps, stats, cand_key, cand_e, cand_id, thr, cut,
                                vocab, logits.stride(0), cap, num_splits, SPLITS=splits,
                                ROW_BLOCK=_ROW_BLOCK, BLOCK=_BLOCK, NT=_NT, num_warps=_WARPS)
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
