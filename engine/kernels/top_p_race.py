"""Top-p draws that run the sort-free cut only for the rows that need it.

The draw (`sampling.sample_race`) picks argmax_v(x_v - log E_v) over the kept tokens of a row.
If the race's winner over the *whole* row, with the same noise, is itself in the nucleus, it is
also the winner over the nucleus (a subset that holds the maximum), so that row's draw is known
without its cut. A token w is in the nucleus iff the mass before it in the stable descending
order is below top_p:

    mass_before(w) = sum of p_v over x_v > x_w, or x_v == x_w and v < w.

The race lands in the nucleus with probability >= top_p (0.9 typically), so most rows are done
after two passes over the row; the rest run the whole cut (`top_p.top_p_cut`, whose kernels do
no work for rows marked done) and the cut's race. Launches, all without host syncs:
1. `_row_stats_kernel` with RACE (grid (B, C)): each chunk's max and sum exp(x - m) for the cut
   (the same numbers its own step 1 computes) and the chunk's race winner;
2. `_mass_before_kernel` (grid (B, C)): each chunk's part of mass_before(w);
3. `_accept_kernel` (grid (B,)): a row whose mass_before(w) lies below p S by a margin of
   1e-4 S (S = sum exp(x - m); far above float rounding of either sum, so the cut's own
   decision agrees) is done: its id is w and its top_p becomes 1 for the cut's launches;
4. the cut's launches (step 1 skipped: its stats are reused) and the race with the cut, both
   skipping done rows; then one select.
The ids equal `sample_race(logits, seeds, steps, top_p_cut(...), temps)` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.sampling import sample_race
from engine.kernels.top_p import _ROW_BLOCK, _STATS_CHUNK, row_temperatures, top_p_cut
from engine.kernels.top_p_split import _KEY_MAX, _load_row, _merge_max_sum, _row_stats_kernel

MARGIN = 1e-4  # of the row's total mass: rows this close to the boundary run the whole cut


@triton.jit
def _winner(race_key_ptr, race_idx_ptr, row, num_splits, SPLITS: tl.constexpr):
    """The race's winner over the whole row from the chunks' winners (lowest id on ties)."""
    j = tl.arange(0, SPLITS)
    keys = tl.load(race_key_ptr + row * SPLITS + j, mask=j < num_splits, other=float("-inf"))
    ids = tl.load(race_idx_ptr + row * SPLITS + j, mask=j < num_splits, other=_KEY_MAX)
    top = tl.max(keys, axis=0)
    return tl.min(tl.where(keys == top, ids, _KEY_MAX), axis=0)


@triton.jit
def _row_max_sum(stats_ptr, row, num_splits, SPLITS: tl.constexpr):
    """m and S of the row from its chunks' stats, merged as the cut's compaction merges them."""
    j = tl.arange(0, SPLITS)
    m_part = tl.load(stats_ptr + row * 2 * SPLITS + j, mask=j < num_splits, other=float("-inf"))
    s_part = tl.load(stats_ptr + row * 2 * SPLITS + SPLITS + j, mask=j < num_splits, other=0.0)
    return _merge_max_sum(m_part, s_part)


@triton.jit
def _mass_before_kernel(logits_ptr, temps_ptr, top_ps_ptr, stats_ptr, race_key_ptr,
                        race_idx_ptr, part_ptr, vocab, row_stride, chunk, num_splits,
                        SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row, j): sum exp(x - m) over the tokens of chunk j before the winner w."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    if tl.load(top_ps_ptr + row) < 1.0:
        row_ptr = logits_ptr + row * row_stride
        temp = tl.load(temps_ptr + row)
        m, s = _row_max_sum(stats_ptr, row, num_splits, SPLITS)
        w = _winner(race_key_ptr, race_idx_ptr, row, num_splits, SPLITS)
        # a NaN row has no winner (w = _KEY_MAX): read in bounds; its sums are NaN and it
        # goes to the cut like any row the race does not decide
        x_w = tl.math.div_rn(tl.load(row_ptr + tl.minimum(w, vocab - 1)), temp)
        end = tl.minimum(split * chunk + chunk, vocab)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(split * chunk, end, BLOCK):
            v = start + tl.arange(0, BLOCK)
            x = _load_row(row_ptr, v, v < end, temp)
            before = (x > x_w) | ((x == x_w) & (v < w))
            acc += tl.where(before & (v < end), tl.exp(x - m), 0.0)
        tl.store(part_ptr + row * SPLITS + split, tl.sum(acc, axis=0))


@triton.jit
def _accept_kernel(top_ps_ptr, stats_ptr, race_key_ptr, race_idx_ptr, part_ptr, ids_ptr,
                   left_ps_ptr, done_ptr, num_splits, margin, SPLITS: tl.constexpr):
    """Per row: the winner's id, whether it is surely in the nucleus (done), and the top_p the
    cut runs with (1, i.e. no work, for done rows)."""
    row = tl.program_id(0).to(tl.int64)
    p = tl.load(top_ps_ptr + row)
    w = _winner(race_key_ptr, race_idx_ptr, row, num_splits, SPLITS)
    done = p >= 1.0
    if p < 1.0:
        j = tl.arange(0, SPLITS)
        before = tl.sum(tl.load(part_ptr + row * SPLITS + j, mask=j < num_splits, other=0.0),
                        axis=0)
        m, s = _row_max_sum(stats_ptr, row, num_splits, SPLITS)
        done = before < (p - margin) * s
    tl.store(ids_ptr + row, w.to(tl.int64))
    tl.store(left_ps_ptr + row, tl.where(done, 1.0, p))
    tl.store(done_ptr + row, done.to(tl.int8))


def sample_top_p(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                 top_ps: torch.Tensor, temperatures: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """[B] int64 draws from the nucleus (top_ps) of `logits / temperatures[:, None]`, with the
    race's noise of (seeds, steps): the ids of `sample_race` on `top_p_cut`'s bounds."""
    return draws_and_done(logits, seeds, steps, top_ps, temperatures)[0]


def draws_and_done(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                   top_ps: torch.Tensor, temperatures: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_top_p`'s ids and [B] bool: which rows the whole-row race decided (the rest ran
    the cut; tests and benchmarks count them)."""
    batch, vocab = logits.shape
    logits = logits.float().contiguous()
    top_ps = top_ps.float().contiguous()
    temps = row_temperatures(temperatures, batch, logits.device)
    num_splits = triton.cdiv(vocab, _STATS_CHUNK)
    splits = triton.next_power_of_2(num_splits)
    dev = logits.device
    stats = torch.empty(batch, 2 * splits, dtype=torch.float32, device=dev)
    race_key = torch.empty(batch, splits, dtype=torch.float32, device=dev)
    race_idx = torch.empty(batch, splits, dtype=torch.int32, device=dev)
    part = torch.empty(batch, splits, dtype=torch.float32, device=dev)
    ids = torch.empty(batch, dtype=torch.int64, device=dev)
    left_ps = torch.empty(batch, dtype=torch.float32, device=dev)
    done = torch.empty(batch, dtype=torch.int8, device=dev)
    grid = (batch, num_splits)
    stride = logits.stride(0)
    _row_stats_kernel[grid](logits, temps, stats, vocab, stride, _STATS_CHUNK, seeds, steps,
                            race_key, race_idx, SPLITS=splits, BLOCK=_ROW_BLOCK, RACE=True,
                            num_warps=4)
    _mass_before_kernel[grid](logits, temps, top_ps, stats, race_key, race_idx, part, vocab,
                              stride, _STATS_CHUNK, num_splits, SPLITS=splits,
                              BLOCK=_ROW_BLOCK, num_warps=4)
    _accept_kernel[(batch,)](top_ps, stats, race_key, race_idx, part, ids, left_ps, done,
                             num_splits, MARGIN, SPLITS=splits, num_warps=1)
    bounds = top_p_cut(logits, left_ps, temperatures=temps, row_stats=stats)
    rest = sample_race(logits, seeds, steps, bounds, temps, skip=done)
    decided = done.bool()
    return torch.where(decided, ids, rest), decided
