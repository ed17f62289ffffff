"""The whole-row passes of the sort-free top-p cut (`engine/kernels/top_p.py`), split over
chunks of the row, and the helpers they share with its per-row kernel.

Each pass runs with grid (B, C): program (row, j) covers tokens [j * chunk, (j + 1) * chunk)
and writes its part to a small per-row array; the next launch merges the parts in chunk order.
What the launches hand on, per row (rows with top_p >= 1 read and write none of it):

    state_i  int64 [B, 8]     lo, hi, n = #(key >= lo), n_hi = #(key >= hi), by_value (the
                              next narrowing pass splits by value), overflowed (more
                              candidates than narrow_to: the row is narrowed by the split
                              passes)
    state_f  float32 [B, 4]   m (row max), target (p * sum exp(x - m)), mass_hi = mass(key >= hi)
    info     int32 [B, 3, C]  per chunk of the last compaction: how many tokens it has in
                              [lo, hi) (stored or not), the smallest of their keys, the
                              smallest key >= hi
    narrow   [B, NT] int32 thresholds; [B, C, NT] float32 masses and int32 counts at/above them

(C, the number of chunks, rounded up to a power of 2 in these arrays.)

m and target are computed once (by the first compaction) and read by every later launch, so
every decision compares the same numbers. A narrowing pass's mass at each threshold is the sum,
in chunk order, of per-chunk sums that all have the same shape: nested sums in one order for
every threshold, so the masses stay monotone in the threshold and the decisions consistent.
"""

from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels.race_noise import race_key, race_step, race_winner, row_key

_KEY_MIN = tl.constexpr(-2147483648)
_KEY_MAX = tl.constexpr(2147483647)
STATE_INTS = 8  # per-row int64 state: lo, hi, n, n_hi, by_value, overflowed (2 spare)
STATE_FLOATS = 4  # per-row float32 state: m, target, mass_hi (1 spare)
_SI = tl.constexpr(STATE_INTS)
_SF = tl.constexpr(STATE_FLOATS)


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
def _load_row(row_ptr, i, valid, temp):
    """Logits i of a row divided by its temperature, -inf where not valid. The division rounds
    to nearest (IEEE), as torch's `logits / temperature` does: the same tempered values, so the
    same cut as on a tempered copy (which the fused division saves)."""
    x = tl.load(row_ptr + i, mask=valid, other=float("-inf"))
    return tl.math.div_rn(x, temp)


@triton.jit
def _chunk(src_ptr, e_ptr, id_ptr, start, count, m, temp, FROM_ROW: tl.constexpr,
           BLOCK: tl.constexpr):
    """(key, exp(x - m), id, valid) of elements [start, start + BLOCK) (below `count`) of the
    searched set: the row's logits divided by the row's temperature `temp` (FROM_ROW; see
    `_load_row`) or the candidate buffer (src_ptr = keys)."""
    i = start + tl.arange(0, BLOCK)
    valid = i < count
    if FROM_ROW:
        x = _load_row(src_ptr, i, valid, temp)
        k = _key(x)
        e = tl.exp(x - m)
        ids = i
    else:
        k = tl.load(src_ptr + i, mask=valid, other=0)
        e = tl.load(e_ptr + i, mask=valid, other=0.0)
        ids = tl.load(id_ptr + i, mask=valid, other=0)
    return tl.where(valid, k, _KEY_MIN), tl.where(valid, e, 0.0), ids, valid


@triton.jit
def _merge_max_sum(m_vec, s_vec):
    """(max, sum exp(x - max)) from partial maxima and sums (partial max -inf: empty)."""
    m = tl.max(m_vec, axis=0)
    scale = tl.exp(tl.where(m_vec == float("-inf"), float("-inf"), m_vec - m))
    return m, tl.sum(tl.where(m_vec == float("-inf"), 0.0, s_vec * scale), axis=0)


@triton.jit
def _row_stats_kernel(logits_ptr, temps_ptr, stats_ptr, vocab, row_stride, chunk, seeds_ptr,
                      steps_ptr, race_key_ptr, race_idx_ptr, SPLITS: tl.constexpr,
                      BLOCK: tl.constexpr, RACE: tl.constexpr):
    """Step 1, split: program (row, j) writes the max m_j and sum exp(x - m_j) of its `chunk`
    of the row (online, as in softmax) to stats[row, j] (m) and stats[row, SPLITS + j] (s).
    RACE: also the chunk's race winner over the whole row, no cut (top_p_race.py): its key
    and lowest id at race_key/race_idx[row, j], with the noise of `sampling.sample_race`."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * row_stride
    temp = tl.load(temps_ptr + row)
    end = tl.minimum(split * chunk + chunk, vocab)
    m_vec = tl.full([BLOCK], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK], tl.float32)
    best_key = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.full([BLOCK], _KEY_MAX, tl.int32)
    if RACE:
        key_of_row = row_key(tl.load(seeds_ptr + row), tl.load(steps_ptr + row))
    for start in range(split * chunk, end, BLOCK):
        v = start + tl.arange(0, BLOCK)
        x = _load_row(row_ptr, v, v < end, temp)
        new_m = tl.maximum(m_vec, x)
        scale = tl.exp(tl.where(m_vec == float("-inf"), float("-inf"), m_vec - new_m))
        term = tl.exp(tl.where(x == float("-inf"), float("-inf"), x - new_m))
        s_vec = s_vec * scale + term
        m_vec = new_m
        if RACE:
            best_key, best_idx = race_step(best_key, best_idx, race_key(x, key_of_row, v), v,
                                           v < end)
    m, s = _merge_max_sum(m_vec, s_vec)
    tl.store(stats_ptr + row * 2 * SPLITS + split, m)
    tl.store(stats_ptr + row * 2 * SPLITS + SPLITS + split, s)
    if RACE:
        top, first = race_winner(best_key, best_idx, split * chunk)
        tl.store(race_key_ptr + row * SPLITS + split, top)
        tl.store(race_idx_ptr + row * SPLITS + split, first)


@triton.jit
def _compact(row_ptr, begin, end, m, temp, lo, hi, cand_key, cand_e, cand_id, n, cap,
             ROW_BLOCK: tl.constexpr):
    """Store (key, exp(x - m), id) of the tokens of [begin, end) with lo <= key < hi (int64
    bounds), in id order, in slots n, n + 1, ... below `cap`; returns n plus how many there
    are (stored or not), the smallest of their keys and the smallest key >= hi (_KEY_MAX if
    none)."""
    n = n + tl.zeros((), tl.int32)  # a tensor (the caller may pass 0): the loop carries it
    min_vec = tl.full([ROW_BLOCK], _KEY_MAX, tl.int32)
    min_kept = tl.full([ROW_BLOCK], _KEY_MAX, tl.int32)
    for start in range(begin, end, ROW_BLOCK):
        v = start + tl.arange(0, ROW_BLOCK)
        x = _load_row(row_ptr, v, v < end, temp)
        k = _key(x)
        keep = (v < end) & (k >= lo) & (k < hi)
        min_vec = tl.minimum(min_vec, tl.where((v < end) & (k >= hi), k, _KEY_MAX))
        min_kept = tl.minimum(min_kept, tl.where(keep, k, _KEY_MAX))
        num = tl.sum(keep.to(tl.int32), axis=0)
        # the scan and the stores only where they store something: most blocks of a narrowed
        # interval hold no token of it, and a flat row's candidates fill the buffer early
        if (num > 0) & (n < cap):
            pos = n + tl.cumsum(keep.to(tl.int32), axis=0) - 1
            fits = keep & (pos < cap)
            tl.store(cand_key + pos, k, mask=fits)
            tl.store(cand_e + pos, tl.exp(x - m), mask=fits)
            tl.store(cand_id + pos, v, mask=fits)
        n += num
    tl.debug_barrier()  # the buffer is visible to every warp of the search
    return n, tl.min(min_kept, axis=0), tl.min(min_vec, axis=0)


@triton.jit
def _narrow_thresholds(lo, hi, by_value, NT: tl.constexpr):
    """The NT ascending int32 thresholds of a narrowing pass on [lo, hi) (int64 keys). The
    first pass (by_value) spaces them evenly in *value* between the logits at lo and hi - 1
    (lo: the smallest candidate key): a flat row's logits span a few binades around 0, a
    sliver of the key range, while 17 value buckets split them into comparable parts (one pass
    instead of 3 for randn * 0.02 at p 0.9). Later passes split the key interval evenly
    (17-fold each, so narrowing stays bounded by 1 + 8 passes)."""
    j = (tl.arange(0, NT) + 1).to(tl.int64)
    frac = j.to(tl.float32) / (NT + 1)
    step = (hi - lo + NT) // (NT + 1)
    a = _value(lo.to(tl.int32))
    b = _value((hi - 1).to(tl.int32))
    thr_value = tl.minimum(tl.maximum(_key(a + (b - a) * frac).to(tl.int64), lo + 1), hi)
    return tl.where(by_value != 0, thr_value, tl.minimum(lo + j * step, hi)).to(tl.int32)


@triton.jit
def _threshold_sums(row_ptr, begin, end, m, temp, thr, NT: tl.constexpr, BLOCK: tl.constexpr):
    """Mass (sum of exp(x - m)) and count of the tokens of [begin, end) at/above each
    threshold: an [NT, BLOCK] compare, each exp computed once per token."""
    acc = tl.zeros([NT, BLOCK], tl.float32)
    num = tl.zeros([NT, BLOCK], tl.int32)
    for start in range(begin, end, BLOCK):
        k, e, ids, valid = _chunk(row_ptr, row_ptr, row_ptr, start, end, m, temp, True, BLOCK)
        at_least = k[None, :] >= thr[:, None]
        acc += tl.where(at_least, e[None, :], 0.0)
        num += at_least.to(tl.int32)
    return tl.sum(acc, axis=1), tl.sum(num, axis=1)


@triton.jit
def _narrow_update(lo, hi, n, n_hi, mass_hi, thr, mass, count, target, NT: tl.constexpr):
    """One narrowing pass's decision from the whole row's mass and count at/above each
    threshold: lo moves to the last passing threshold (n: the count there), hi to the first
    failing one (n_hi, mass_hi: the count and mass there). Masses are monotone in the threshold
    (nested sums in one order): count the passing; a threshold clamped to hi is known to fail
    (rounding in this pass may disagree with an earlier one)."""
    j = (tl.arange(0, NT) + 1).to(tl.int64)
    passing = (mass >= target) & (thr < hi)
    above = tl.sum(passing.to(tl.int64), axis=0)
    n = tl.where(above > 0, tl.sum(tl.where(j == above, count, 0), axis=0), n)
    new_hi = j == above + 1
    n_hi = tl.where(above < NT, tl.sum(tl.where(new_hi, count, 0), axis=0), n_hi)
    mass_hi = tl.where(above < NT, tl.sum(tl.where(new_hi, mass, 0.0), axis=0), mass_hi)
    lo = tl.maximum(lo, tl.max(tl.where(passing, thr, lo), axis=0))
    hi = tl.minimum(hi, tl.min(tl.where(passing, hi, thr), axis=0))
    return lo, hi, n.to(tl.int64), n_hi.to(tl.int64), mass_hi


@triton.jit
def _narrow_row(row_ptr, vocab, m, temp, lo, hi, target, n, n_hi, mass_hi, by_value, cap,
                NT: tl.constexpr, BLOCK: tl.constexpr):
    """Serial narrowing, from the state the split passes left: k-ary passes over the whole row
    on [lo, hi) (int64 keys; mass(>= lo) >= target > mass(>= hi) = mass_hi) until the tokens
    *inside* [lo, hi) fit the buffer or the interval is one key wide. Returns (lo, hi,
    #(lo <= key < hi), mass(key >= hi))."""
    while (hi - lo > 1) & (n - n_hi > cap):
        thr = _narrow_thresholds(lo, hi, by_value, NT)
        by_value = by_value * 0
        mass, count = _threshold_sums(row_ptr, 0, vocab, m, temp, thr, NT, BLOCK)
        lo, hi, n, n_hi, mass_hi = _narrow_update(lo, hi, n, n_hi, mass_hi, thr, mass, count,
                                                  target, NT)
    return lo, hi, n - n_hi, mass_hi


@triton.jit
def _compact_split_kernel(logits_ptr, temps_ptr, top_ps_ptr, stats_ptr, state_i_ptr,
                          state_f_ptr, info_ptr, cand_key_ptr, cand_e_ptr, cand_id_ptr, vocab,
                          row_stride, cap, region, chunk, num_splits, NARROWED: tl.constexpr,
                          SPLITS: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Program (row, j) compacts the tokens of chunk j with lo <= key < hi into region j
    (`region` slots from j * region) of the row's buffer and writes the chunk's info. Not
    NARROWED: the candidates (key >= the bound of step 2) of every row with top_p < 1; program
    (row, 0) also stores m, target and the search's first interval. NARROWED: [lo, hi) of the
    rows whose candidates overflowed narrow_to and whose interval fits cap now."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    p = tl.load(top_ps_ptr + row)
    state_i = state_i_ptr + row * _SI
    state_f = state_f_ptr + row * _SF
    if p < 1.0:
        if NARROWED:
            lo = tl.load(state_i)
            hi = tl.load(state_i + 1)
            fits = tl.load(state_i + 2) - tl.load(state_i + 3) <= cap
            go = (tl.load(state_i + 5) != 0) & fits
            m = tl.load(state_f)
        else:
            j = tl.arange(0, SPLITS)
            m_part = tl.load(stats_ptr + row * 2 * SPLITS + j, mask=j < num_splits,
                             other=float("-inf"))
            s_part = tl.load(stats_ptr + row * 2 * SPLITS + SPLITS + j, mask=j < num_splits,
                             other=0.0)
            m, s = _merge_max_sum(m_part, s_part)
            lo = _key(m + tl.log(s * (1.0 - p) / vocab) - 1e-3).to(tl.int64)
            hi = tl.full((), _KEY_MAX, tl.int64) + 1  # above every key
            go = p < 1.0
            if split == 0:
                tl.store(state_f, m)
                tl.store(state_f + 1, p * s)
                tl.store(state_i, lo)
                tl.store(state_i + 1, _key(m).to(tl.int64) + 1)
        if go:
            begin = split * chunk
            off = row * cap + split * region
            n, min_kept, min_above = _compact(logits_ptr + row * row_stride, begin,
                                              tl.minimum(begin + chunk, vocab), m,
                                              tl.load(temps_ptr + row), lo, hi,
                                              cand_key_ptr + off, cand_e_ptr + off,
                                              cand_id_ptr + off, 0, region, ROW_BLOCK)
            info = info_ptr + row * 3 * SPLITS + split
            tl.store(info, n)
            tl.store(info + SPLITS, min_kept)
            tl.store(info + 2 * SPLITS, min_above)


@triton.jit
def _narrow_state(state_i, state_f, info, narrow_to, num_splits, FIRST: tl.constexpr,
                  SPLITS: tl.constexpr):
    """The row's (lo, hi, n, n_hi, mass_hi, by_value, overflowed) before a narrowing pass. FIRST:
    from the candidate compaction's info (overflowed: more candidates than narrow_to, the most
    the per-row search should scan; then lo rises to the smallest candidate key: no key in
    between, the same mass); later: as the last merge stored it."""
    if FIRST:
        j = tl.arange(0, SPLITS)
        n = tl.sum(tl.load(info + j, mask=j < num_splits, other=0), axis=0).to(tl.int64)
        min_kept = tl.min(tl.load(info + SPLITS + j, mask=j < num_splits, other=_KEY_MAX), axis=0)
        overflowed = (n > narrow_to).to(tl.int64)
        lo = tl.load(state_i)
        lo = tl.where(overflowed != 0, tl.maximum(lo, min_kept.to(tl.int64)), lo)
        hi = tl.load(state_i + 1)
        n_hi = n * 0
        by_value = overflowed * 0 + 1
        mass_hi = tl.zeros((), tl.float32)
    else:
        lo = tl.load(state_i)
        hi = tl.load(state_i + 1)
        n = tl.load(state_i + 2)
        n_hi = tl.load(state_i + 3)
        by_value = tl.load(state_i + 4)
        overflowed = tl.load(state_i + 5)
        mass_hi = tl.load(state_f + 2)
    return lo, hi, n, n_hi, mass_hi, by_value, overflowed


@triton.jit
def _narrow_split_kernel(logits_ptr, temps_ptr, top_ps_ptr, state_i_ptr, state_f_ptr, info_ptr,
                         thr_ptr, mass_ptr, count_ptr, vocab, row_stride, narrow_to, chunk,
                         num_splits, FIRST: tl.constexpr, SPLITS: tl.constexpr,
                         NT: tl.constexpr, BLOCK: tl.constexpr):
    """One narrowing pass, split: program (row, j) writes the mass and count at/above the
    pass's thresholds over chunk j; program (row, 0) also writes the thresholds. Only rows
    whose interval still holds more than narrow_to tokens (and is wider than one key) take
    part."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    p = tl.load(top_ps_ptr + row)
    if p < 1.0:
        lo, hi, n, n_hi, mass_hi, by_value, overflowed = _narrow_state(
            state_i_ptr + row * _SI, state_f_ptr + row * _SF, info_ptr + row * 3 * SPLITS,
            narrow_to, num_splits, FIRST, SPLITS)
        if (hi - lo > 1) & (n - n_hi > narrow_to):
            thr = _narrow_thresholds(lo, hi, by_value, NT)
            begin = split * chunk
            mass, count = _threshold_sums(logits_ptr + row * row_stride, begin,
                                          tl.minimum(begin + chunk, vocab),
                                          tl.load(state_f_ptr + row * _SF),
                                          tl.load(temps_ptr + row), thr, NT, BLOCK)
            t = tl.arange(0, NT)
            tl.store(mass_ptr + (row * SPLITS + split) * NT + t, mass)
            tl.store(count_ptr + (row * SPLITS + split) * NT + t, count)
            if split == 0:
                tl.store(thr_ptr + row * NT + t, thr)


@triton.jit
def _narrow_merge_kernel(top_ps_ptr, state_i_ptr, state_f_ptr, info_ptr, thr_ptr, mass_ptr,
                         count_ptr, narrow_to, num_splits, FIRST: tl.constexpr,
                         SPLITS: tl.constexpr, NT: tl.constexpr):
    """The per-row merge after `_narrow_split_kernel`: the chunks' masses and counts summed in
    chunk order, the pass's decision (`_narrow_update`), the new state stored (FIRST: the
    initial state too, for every row with top_p < 1)."""
    row = tl.program_id(0).to(tl.int64)
    p = tl.load(top_ps_ptr + row)
    state_i = state_i_ptr + row * _SI
    state_f = state_f_ptr + row * _SF
    if p < 1.0:
        lo, hi, n, n_hi, mass_hi, by_value, overflowed = _narrow_state(
            state_i, state_f, info_ptr + row * 3 * SPLITS, narrow_to, num_splits, FIRST, SPLITS)
        if (hi - lo > 1) & (n - n_hi > narrow_to):
            t = tl.arange(0, NT)
            mass = tl.zeros([NT], tl.float32)
            count = tl.zeros([NT], tl.int32)
            for j in tl.static_range(SPLITS):
                live = j * NT + t < num_splits * NT  # chunks past the row: nothing
                mass += tl.load(mass_ptr + (row * SPLITS + j) * NT + t, mask=live, other=0.0)
                count += tl.load(count_ptr + (row * SPLITS + j) * NT + t, mask=live, other=0)
            thr = tl.load(thr_ptr + row * NT + t)
            lo, hi, n, n_hi, mass_hi = _narrow_update(lo, hi, n, n_hi, mass_hi, thr, mass, count,
                                                      tl.load(state_f + 1), NT)
            by_value = by_value * 0
        tl.store(state_i, lo)
        tl.store(state_i + 1, hi)
        tl.store(state_i + 2, n)
        tl.store(state_i + 3, n_hi)
        tl.store(state_i + 4, by_value)
        tl.store(state_i + 5, overflowed)
        tl.store(state_f + 2, mass_hi)
