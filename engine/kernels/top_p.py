"""Sort-free top-p (nucleus) cut: the boundary of each row's nucleus without sorting the row.

The reference (`engine.sampler.apply_top_k_top_p`) sorts each row (stable, descending), keeps
the tokens whose probability mass *before* them is < top_p, and masks the rest. The kept set is
a prefix of the stable order, so it is fully described by two numbers per row:

    t   = the smallest kept logit, and
    cut = the largest kept token id among the tokens whose logit equals t
    kept(v)  <=>  x_v > t  or  (x_v == t and v <= cut).

This finds (t, cut) without a sort, in a fixed sequence of 8 launches (no host sync, no
data-dependent host decision: it can be captured in a CUDA graph). It searches over *keys*: the
float32 bits of a logit as an int32, with the low 31 bits flipped for negatives (and -0 mapped
to +0), so that key order is float order and equal keys are equal floats. Every pass reads the
row divided by its temperature (IEEE division, as torch's; none without temperatures). The
passes over the whole row run split over its C chunks of `_STATS_CHUNK` tokens (grid (B, C):
16 programs a 128k row; `top_p_split.py`), the rest in one program per row
(`_top_p_cut_kernel`):
1. the row max m and S = sum exp(x - m) (online, as in softmax), per chunk
   (`_row_stats_kernel`);
2. the *candidates* x >= m + log(S (1 - p) / V), compacted per chunk (id order) into the
   chunk's region of the row's buffer (`cap // C` slots from j * (cap // C); 1024 at CAP
   16384), with the chunk's count (`_compact_split_kernel`, which also merges m and S and
   stores m and the target p S for every later launch): the tokens below that bound together
   hold less than 1 - p of the mass, so the nucleus lies among the candidates. When more than
   `NARROW_TO` (1,024) qualify in the row (a flat row: random weights, a high temperature; or
   top_p close to 1), the search of step 3 first runs over the whole row, also counting the
   tokens at/above each threshold, until at most `NARROW_TO` tokens lie *inside* its key
   interval [lo, hi) (the first pass splits the candidates' value range evenly, the rest the
   key interval): 2 split passes (`_narrow_split_kernel`: per chunk and threshold a mass and a
   count; `_narrow_merge_kernel`: per row, the chunks summed in chunk order, lo/hi moved), then
   a split compaction of [lo, hi) if it fits the buffer (`CAP`); the mass at/above hi is
   carried as one number (and the smallest key there). These passes read the whole row with
   all of its chunks' programs at once, where step 3 walks the buffer serially in one program
   per row (a flat 128k row has ~16k candidates; at batch 64 the cut took 0.37 ms when only
   rows over `CAP` were narrowed, presumably in that serial walk). The benchmark's 128k rows
   that overflow `CAP` (randn * 0.02 at p 0.9, randn * 3 / 0.8 at p 0.99) fit it after 1 pass;
3. the row's program moves the regions into one id-ordered prefix of the buffer, in place (from
   the first chunk with more tokens than its region on, it compacts the row serially instead).
   A row that still does not fit after the split passes narrows serially over the whole row
   from where they stopped (only a row with more than `CAP` tokens tied at the boundary logit
   is cut over the whole row). Then a k-ary search for K = max{k : mass(key >= k) >= p S}:
   each pass evaluates the mass at/above `_NT` thresholds at once ([NT, BLOCK] compare, each
   exp(x - m) loaded once per element), shrinking the key interval (NT + 1)-fold: at most 8
   passes for 2^32 keys (NT = 16), about 6 for a typical candidate range; each pass also
   compacts the buffer in place to the tokens inside the current interval (the mass above it
   carried as one number), so the passes after the first read a few hundred tokens instead of
   all candidates;
4. t = the smallest logit with key >= K, then one pass that counts the ties at t and picks the
   last kept one by id: the r-th tie (0-based, in id order) is kept while mass(x > t) + r p_t < p.

Masses are summed in a different order than the reference's cumsum (and, over more than one
chunk, the narrowing passes' in a different order than a serial pass's), so a token whose mass
before it lies within float rounding (~1e-7 relative) of top_p may fall on the other side;
everywhere else the kept set is the reference's exactly (tests check it on fresh random rows).
Rows with top_p >= 1 do no work past step 1. Scratch per row: min(CAP, V) * 12 bytes (int32
key, float32 exp, int32 id: 192 KiB at CAP 16384), plus per chunk 8 bytes (max/sum), 12 bytes
(compaction info) and NT * 8 bytes (narrowing sums), plus 144 bytes (state, thresholds): about
2.5 KiB at V = 128256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.top_p_split import (_KEY_MAX, _SF, _SI, STATE_FLOATS, STATE_INTS, _chunk,
                                        _compact, _compact_split_kernel, _narrow_merge_kernel,
                                        _narrow_row, _narrow_split_kernel, _row_stats_kernel,
                                        _value)

_ROW_BLOCK = 1024  # block of the full-row passes (max/sum, compaction) and of the region moves
_STATS_CHUNK = 8192  # tokens per program of the split passes (16 programs a 128k row)
_BLOCK = 512  # the per-row search: an [NT, BLOCK] fp32 tile, 32 per thread at 8 warps (sm_90
# AOT, Triton 3.9: 162 registers in the per-row kernel, no spills)
_NT = 16  # thresholds per search pass: the key interval shrinks 17-fold per pass
_WARPS = 8
_NARROW_PASSES = 2  # split narrowing passes for rows with more than NARROW_TO candidates
CAP = 16384  # candidate slots per row; beyond them the search narrows over the whole row first
# Rows with more candidates than this are narrowed by the split passes (all of the row's chunks
# at once) before the per-row kernel searches them: that kernel walks its buffer serially, one
# program per row
NARROW_TO = 1024
_NEG_INF = float("-inf")


@dataclass
class TopPTuning:
    """Tiles of the whole-row split passes (`benchmarks/top_p_sweep.py` times the choices):
    the compactions scan `compact_block` tokens per step, the narrowing passes compare an
    [NT, narrow_block] tile. Smaller tiles take fewer registers: more programs per SM."""

    compact_block: int = _ROW_BLOCK
    compact_warps: int = 4
    # [16, 256] x 8 warps: 80 registers in the narrowing pass (sm_90 AOT), two blocks per SM
    # (132 at [16, 512]); on an H100 -11 us at batch 64 on 128k-token flat rows, +1.5 at batch 1
    narrow_block: int = 256
    narrow_warps: int = _WARPS


TUNE = TopPTuning()


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
            k, e, ids, valid = _chunk(key_ptr, e_ptr, id_ptr, start, n, m, 1.0, False, BLOCK)
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
def _gather(cand_key, cand_e, cand_id, info, row_ptr, vocab, m, temp, lo, hi, cap, region,
            chunk, num_splits, SPLITS: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Move the chunks' regions of the last split compaction into one id-ordered prefix of the
    buffer, in place: each region moves left, in ascending order, so no slot is written before
    it is read. From the first chunk with more tokens than its region on, the row is compacted
    serially instead. Returns (#tokens in the buffer, smallest key >= hi)."""
    j = tl.arange(0, SPLITS)
    counts = tl.load(info + j, mask=j < num_splits, other=0)
    first_over = tl.min(tl.where((j < num_splits) & (counts > region), j, num_splits), axis=0)
    before = j < first_over
    min_above = tl.min(tl.load(info + 2 * SPLITS + j, mask=before, other=_KEY_MAX), axis=0)
    n = tl.zeros((), tl.int32)
    for r in range(0, first_over):
        num = tl.sum(tl.where(j == r, counts, 0), axis=0)  # no load on the loop's path
        src = r * region
        for start in range(0, tl.where(src == n, 0, num), ROW_BLOCK):  # in place: stays
            i = start + tl.arange(0, ROW_BLOCK)
            valid = i < num
            k = tl.load(cand_key + src + i, mask=valid)
            e = tl.load(cand_e + src + i, mask=valid)
            ids = tl.load(cand_id + src + i, mask=valid)
            tl.debug_barrier()  # every warp holds this block before any slot of it is rewritten
            tl.store(cand_key + n + i, k, mask=valid)
            tl.store(cand_e + n + i, e, mask=valid)
            tl.store(cand_id + n + i, ids, mask=valid)
        n += num
    tl.debug_barrier()  # the moved regions are visible to every warp of the search
    if first_over < num_splits:
        n, min_kept, above = _compact(row_ptr, first_over * chunk, vocab, m, temp, lo, hi,
                                      cand_key, cand_e, cand_id, n, cap, ROW_BLOCK)
        min_above = tl.minimum(min_above, above)
    return n, min_above


@triton.jit
def _cut(src_ptr, e_ptr, id_ptr, count, m, temp, lo, target, mass_hi, min_above,
         FROM_ROW: tl.constexpr, BLOCK: tl.constexpr):
    """(t, cut) once the search stopped at key lo: t = smallest logit with key >= lo; the ties
    at t are kept in id order while the mass before them stays below target. `mass_hi` and
    `min_above`: mass and smallest key of the tokens above the searched set (see
    `_search_buffer`); if none of its tokens is >= lo (only when rounding made the search's
    masses disagree), every token from min_above up is kept."""
    t_vec = tl.full([BLOCK], _KEY_MAX, tl.int32)
    for start in range(0, count, BLOCK):
        k, e, ids, valid = _chunk(src_ptr, e_ptr, id_ptr, start, count, m, temp, FROM_ROW, BLOCK)
        t_vec = tl.minimum(t_vec, tl.where(k >= lo, k, _KEY_MAX))
    t_key = tl.min(t_vec, axis=0)
    none_inside = t_key == _KEY_MAX
    t_key = tl.minimum(t_key, min_above)
    gt_vec = tl.zeros([BLOCK], tl.float32)
    for start in range(0, count, BLOCK):
        k, e, ids, valid = _chunk(src_ptr, e_ptr, id_ptr, start, count, m, temp, FROM_ROW, BLOCK)
        gt_vec += tl.where(k > t_key, e, 0.0)
    mass_gt = mass_hi + tl.sum(gt_vec, axis=0)
    t = _value(t_key)
    p_t = tl.exp(t - m)
    # the r-th tie (0-based) is kept while mass_gt + r * p_t < target
    need = tl.maximum(tl.ceil((target - mass_gt) / p_t), 1.0).to(tl.int32)
    seen = 0
    cut = -1
    for start in range(0, count, BLOCK):
        k, e, ids, valid = _chunk(src_ptr, e_ptr, id_ptr, start, count, m, temp, FROM_ROW, BLOCK)
        tie = valid & (k == t_key)
        rank = seen + tl.cumsum(tie.to(tl.int32), axis=0)
        cut = tl.maximum(cut, tl.max(tl.where(tie & (rank <= need), ids, -1), axis=0))
        seen += tl.sum(tie.to(tl.int32), axis=0)
    return t, tl.where(none_inside, _KEY_MAX, cut)


@triton.jit
def _top_p_cut_kernel(logits_ptr, temps_ptr, top_ps_ptr, state_i_ptr, state_f_ptr, info_ptr,
                      cand_key_ptr, cand_e_ptr, cand_id_ptr, thr_ptr, cut_ptr, vocab, row_stride,
                      cap, region, chunk, num_splits, SPLITS: tl.constexpr,
                      ROW_BLOCK: tl.constexpr, BLOCK: tl.constexpr, NT: tl.constexpr):
    """Steps 3-4 for one row, from the state and buffer regions the split launches left."""
    row = tl.program_id(0).to(tl.int64)
    p = tl.load(top_ps_ptr + row)
    t = tl.full((), float("-inf"), tl.float32)  # top_p >= 1: keep the whole row
    cut = vocab
    if p < 1.0:
        row_ptr = logits_ptr + row * row_stride
        state_i = state_i_ptr + row * _SI
        state_f = state_f_ptr + row * _SF
        m = tl.load(state_f)
        temp = tl.load(temps_ptr + row)
        target = tl.load(state_f + 1)
        mass_hi = tl.load(state_f + 2)
        lo = tl.load(state_i)
        hi = tl.load(state_i + 1)
        n = tl.load(state_i + 2)
        n_hi = tl.load(state_i + 3)
        cand_key = cand_key_ptr + row * cap
        cand_e = cand_e_ptr + row * cap
        cand_id = cand_id_ptr + row * cap
        n_in = (n - n_hi).to(tl.int32)  # tokens inside [lo, hi)
        min_above = tl.full((), _KEY_MAX, tl.int32)
        if n_in <= cap:  # the last split compaction holds them, region by region
            n_in, min_above = _gather(cand_key, cand_e, cand_id, info_ptr + row * 3 * SPLITS,
                                      row_ptr, vocab, m, temp, lo, hi, cap, region, chunk,
                                      num_splits, SPLITS, ROW_BLOCK)
        else:  # more passes needed, or more than cap ties at one key: narrow serially
            lo, hi, n_left, mass_hi = _narrow_row(row_ptr, vocab, m, temp, lo, hi, target, n, n_hi,
                                                  mass_hi, tl.load(state_i + 4), cap, NT, BLOCK)
            n_in = n_left.to(tl.int32)
            if n_in <= cap:
                n_in, min_kept, min_above = _compact(row_ptr, 0, vocab, m, temp, lo, hi,
                                                     cand_key, cand_e, cand_id, 0, cap,
                                                     ROW_BLOCK)
        if n_in <= cap:
            lo, n_in, mass_hi, min_above = _search_buffer(cand_key, cand_e, cand_id, n_in, m, lo,
                                                          hi, target, mass_hi, min_above, NT,
                                                          BLOCK)
            t, cut = _cut(cand_key, cand_e, cand_id, n_in, m, temp, lo, target, mass_hi,
                          min_above, False, BLOCK)
        else:
            t, cut = _cut(row_ptr, row_ptr, row_ptr, vocab, m, temp, lo, target, 0.0, _KEY_MAX,
                          True, BLOCK)
    tl.store(thr_ptr + row, t)
    tl.store(cut_ptr + row, cut)


def top_p_cut(logits: torch.Tensor, top_ps: torch.Tensor, cap: int = CAP,
              narrow_to: int = NARROW_TO, temperatures: torch.Tensor | None = None,
              row_stats: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [B] float32, cut [B] int32) of each row's nucleus; rows with top_p >= 1 keep all
    (t = -inf, cut = vocab). `logits` is [B, V] float32 on CUDA (or the Triton interpreter).
    `temperatures` [B]: the nucleus of `logits / temperatures[:, None]` (t on that scale),
    divided as each pass reads the row, without a tempered copy.
    `cap`: candidate slots per row; `narrow_to` (at most cap): rows with more candidates are
    narrowed by the split passes first (tests shrink both to reach those paths at small V).
    `row_stats`: step 1's [B, 2 * next_power_of_2(C)] output for these rows (`_row_stats_kernel`),
    when the caller ran it."""
    if cap < 1 or narrow_to < 1:
        raise ValueError(f"cap and narrow_to must be >= 1, got {cap}, {narrow_to}")
    batch, vocab = logits.shape
    logits = logits.float().contiguous()
    top_ps = top_ps.float().contiguous()
    temps = row_temperatures(temperatures, batch, logits.device)
    cap = min(cap, vocab)
    narrow_to = min(narrow_to, cap)
    num_splits = triton.cdiv(vocab, _STATS_CHUNK)
    splits = triton.next_power_of_2(num_splits)
    region = cap // num_splits
    dev = logits.device
    state_i = torch.empty(batch, STATE_INTS, dtype=torch.int64, device=dev)
    state_f = torch.empty(batch, STATE_FLOATS, dtype=torch.float32, device=dev)
    info = torch.empty(batch, 3 * splits, dtype=torch.int32, device=dev)
    narrow_thr = torch.empty(batch, _NT, dtype=torch.int32, device=dev)
    narrow_mass = torch.empty(batch, splits * _NT, dtype=torch.float32, device=dev)
    narrow_count = torch.empty(batch, splits * _NT, dtype=torch.int32, device=dev)
    cand_key = torch.empty(batch, cap, dtype=torch.int32, device=dev)
    cand_e = torch.empty(batch, cap, dtype=torch.float32, device=dev)
    cand_id = torch.empty(batch, cap, dtype=torch.int32, device=dev)
    thr = torch.empty(batch, dtype=torch.float32, device=dev)
    cut = torch.empty(batch, dtype=torch.int32, device=dev)
    split_grid = (batch, num_splits)
    stride = logits.stride(0)
    if row_stats is None:
        stats = torch.empty(batch, 2 * splits, dtype=torch.float32, device=dev)
        _row_stats_kernel[split_grid](logits, temps, stats, vocab, stride, _STATS_CHUNK, stats,
                                      stats, stats, stats, SPLITS=splits, BLOCK=_ROW_BLOCK,
                                      RACE=False, num_warps=4)
    else:  # step 1 done by the caller (top_p_race.py), on these rows and temperatures
        stats = row_stats
    compact_args = (logits, temps, top_ps, stats, state_i, state_f, info, cand_key, cand_e, cand_id,
                    vocab, stride, cap, region, _STATS_CHUNK, num_splits)
    _compact_split_kernel[split_grid](*compact_args, NARROWED=False, SPLITS=splits,
                                      ROW_BLOCK=TUNE.compact_block,
                                      num_warps=TUNE.compact_warps)
    for pass_index in range(_NARROW_PASSES):
        _narrow_split_kernel[split_grid](logits, temps, top_ps, state_i, state_f, info,
                                         narrow_thr, narrow_mass, narrow_count, vocab, stride,
                                         narrow_to, _STATS_CHUNK, num_splits,
                                         FIRST=pass_index == 0, SPLITS=splits, NT=_NT,
                                         BLOCK=TUNE.narrow_block, num_warps=TUNE.narrow_warps)
        _narrow_merge_kernel[(batch,)](top_ps, state_i, state_f, info, narrow_thr, narrow_mass,
                                       narrow_count, narrow_to, num_splits,
                                       FIRST=pass_index == 0,
                                       SPLITS=splits, NT=_NT, num_warps=1)
    _compact_split_kernel[split_grid](*compact_args, NARROWED=True, SPLITS=splits,
                                      ROW_BLOCK=TUNE.compact_block,
                                      num_warps=TUNE.compact_warps)
    _top_p_cut_kernel[(batch,)](logits, temps, top_ps, state_i, state_f, info, cand_key, cand_e,
                                cand_id, thr, cut, vocab, stride, cap, region, _STATS_CHUNK,
                                num_splits, SPLITS=splits, ROW_BLOCK=_ROW_BLOCK, BLOCK=_BLOCK,
                                NT=_NT, num_warps=_WARPS)
    return thr, cut


def row_temperatures(temperatures: torch.Tensor | None, batch: int,
                  device: torch.device) -> torch.Tensor:
    """[B] float32 temperatures for the kernels (ones when none: dividing by 1 is exact)."""
    if temperatures is None:
        return torch.ones(batch, dtype=torch.float32, device=device)
    if temperatures.shape != (batch,):
        raise ValueError(f"temperatures must be [{batch}], got {list(temperatures.shape)}")
    return temperatures.float().contiguous()


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
