"""The sort-free top-p cut (engine/kernels/top_p.py) against the sorting reference
`engine.sampler.apply_top_p`: the same kept set on fresh random rows (peaked, flat, tied,
partly masked; candidates within the buffer and overflowing it), and the same sampled ids
through the Sampler on the same noise."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import apply_top_p

pytestmark = pytest.mark.gpu

NEG_INF = float("-inf")


def _kept_ref(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    return apply_top_p(logits.cpu().float(), top_ps.cpu()) != NEG_INF


def _kept(logits: torch.Tensor, top_ps: torch.Tensor, cap: int | None = None,
          narrow_to: int | None = None) -> torch.Tensor:
    """The kernel's kept set; `cap` shrinks the buffer to reach its overflow paths at small V,
    `narrow_to` the candidate count above which the split passes narrow a row first."""
    from engine.kernels.top_p import CAP, NARROW_TO, apply_cut, top_p_cut

    thr, cut = top_p_cut(logits, top_ps, cap=cap or CAP, narrow_to=narrow_to or NARROW_TO)
    assert torch.isfinite(thr[top_ps < 1]).all(), f"non-finite threshold {thr}"
    return apply_cut(logits.float(), thr, cut).cpu() != NEG_INF


def _assert_same_or_rounding(got, want, logits, top_ps):
    """Equal kept sets, except a token whose mass before it is within float rounding of p."""
    for row in (got != want).any(dim=1).nonzero().flatten().tolist():
        probs = logits[row].cpu().double().softmax(-1)
        order = torch.sort(logits[row].cpu(), descending=True, stable=True).indices
        before = probs[order].cumsum(0) - probs[order]
        for v in (got[row] != want[row]).nonzero().flatten().tolist():
            rank = (order == v).nonzero().item()
            gap = abs(before[rank].item() - top_ps[row].item())
            assert gap < 1e-5, f"row {row} token {v}: mass before {before[rank]:.8f} vs p"


@pytest.mark.parametrize("vocab", [7, 1000, 3001, 49152])
@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
@pytest.mark.parametrize("narrow_to", [None, 24], ids=["default", "narrow24"])
def test_cut_equals_the_sorting_reference(device, vocab, scale, narrow_to):
    """narrow24: rows with over 24 candidates (default: 1,024) are narrowed by the split passes."""
    if device == "cpu" and vocab > 3001:
        pytest.skip("the interpreter is slow at this vocabulary")
    top_ps = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0], device=device)
    logits = torch.randn(len(top_ps), vocab, device=device) * scale
    got, want = _kept(logits, top_ps, narrow_to=narrow_to), _kept_ref(logits, top_ps)
    assert got[-1].all(), "top_p = 1 must keep the whole row"
    assert got.any(dim=1).all(), "every row keeps at least its top token"
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_ties_are_kept_in_id_order(device):
    """Quantized logits: the boundary falls inside a run of equal logits; the lower ids win,
    as in the reference's stable sort."""
    logits = (torch.randn(6, 2000, device=device) * 2).round()
    logits[0] = 0.0  # all tied: keep exactly ceil(p * V) lowest ids
    top_ps = torch.tensor([0.5, 0.5, 0.7, 0.9, 0.33, 0.999], device=device)
    got, want = _kept(logits, top_ps), _kept_ref(logits, top_ps)
    assert got[0].nonzero().flatten().tolist() == list(range(1000))
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_masked_tokens_and_overflowing_candidates(device):
    """-inf entries are never kept; a flat row whose candidates exceed the buffer falls back to
    the whole-row search and still matches."""
    from engine.kernels.top_p import CAP

    vocab = 3 * CAP + 17
    logits = torch.rand(3, vocab, device=device) * 0.01  # nearly flat: thousands of candidates
    logits[1, ::3] = NEG_INF
    logits[2, : vocab - 5] = NEG_INF  # five live tokens
    top_ps = torch.tensor([0.9, 0.6, 0.99], device=device)
    got, want = _kept(logits, top_ps), _kept_ref(logits, top_ps)
    assert got[0].sum() > CAP
    assert not got[1, ::3].any() and got[2].sum() <= 5
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_sampler_draws_the_same_ids_with_the_cut(device):
    """Temperature + top-p through the Sampler: the ids equal the sorting path's on the same
    noise (the cut is applied on CUDA; on the interpreter it is called directly here)."""
    from engine.kernels.top_p import apply_top_p as apply_top_p_fast
    from engine.kernels.sampling import sample_race

    batch, vocab = 16, 3001
    logits = torch.randn(batch, vocab, device=device) * 4 / 0.8
    top_ps = torch.full((batch,), 0.9, device=device)
    seeds = torch.randint(0, 2**62, (batch,), device=device)
    steps = torch.randint(0, 1000, (batch,), device=device)
    fast = sample_race(apply_top_p_fast(logits, top_ps), seeds, steps).cpu()
    slow = sample_race(apply_top_p(logits.float(), top_ps).to(device), seeds, steps).cpu()
    assert torch.equal(fast, slow)


def test_sampler_on_cuda_uses_the_cut(cuda):
    """The Sampler's top-p rows on CUDA (sort-free) give the sorting path's ids."""
    from engine.sampling_params import SamplingParams
    from tests.kernels.test_top_p_temperature import sampler_ids_with_and_without_triton

    params = [SamplingParams(temperature=0.8, top_p=0.9) for _ in range(64)]
    fast, slow = sampler_ids_with_and_without_triton(
        torch.randn(64, 128256, device="cuda") * 3, params)
    assert torch.equal(fast, slow)


# --- the k-ary key search: worst cases (flat rows, overflowing candidates) and edge rows -----


def _kept_exact(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """The sorting reference on float64 logits: at 128k tokens the float32 reference's own
    cumsum drifts by more than 1e-5 around p (measured: 239 of 35k kept tokens at p 0.999), so
    large rows are compared with the exact nucleus instead, under the same rounding allowance."""
    return apply_top_p(logits.cpu().double(), top_ps.cpu().double()) != NEG_INF


def _candidates(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Which tokens pass the kernel's candidate bound m + log(S (1 - p) / V) (a [B, V] mask)."""
    x = logits.cpu().double()
    m = x.max(dim=1, keepdim=True).values
    s = (x - m).exp().sum(dim=1, keepdim=True)
    return x >= m + torch.log(s * (1 - top_ps.cpu().double()[:, None]) / x.shape[1])


def _num_candidates(logits: torch.Tensor, top_ps: torch.Tensor) -> list[int]:
    """How many tokens pass the kernel's candidate bound in each row."""
    return _candidates(logits, top_ps).sum(dim=1).tolist()


def test_flat_rows_at_a_full_vocabulary(device):
    """The benchmark's row (randn * 3 / T 0.8 over 128256 tokens): at p 0.9 the candidates
    fit the buffer, at 0.999 they overflow it and the overflow path runs; every kept set equals
    the exact nucleus. Fixed rows: which path a fresh row takes depends on its maximum (a
    fresh row at p 0.9 once had 17,675 candidates)."""
    from engine.kernels.top_p import CAP

    top_ps = torch.tensor([0.9, 0.95, 0.99, 0.999], device=device)
    rows = torch.randn(len(top_ps), 128256, generator=torch.Generator().manual_seed(0))
    logits = rows.to(device) * 3 / 0.8
    counts = _num_candidates(logits, top_ps)
    assert counts[0] < CAP and counts[-1] > CAP, counts
    got, want = _kept(logits, top_ps), _kept_exact(logits, top_ps)
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_whole_row_search_with_ties_and_masks(device):
    """More candidates than CAP: a nearly uniform row (the nucleus itself exceeds the buffer),
    quantized rows whose boundary falls inside a run of ties (kept in id order over the whole
    row), and a flat row with every third token masked."""
    from engine.kernels.top_p import CAP

    vocab = 3 * CAP
    logits = torch.randn(5, vocab, device=device)
    logits[1:3] = (logits[1:3] * 2).round()
    logits[3] = 1.0  # all tied: exactly ceil(p * V) lowest ids
    logits[4, 1::3] = NEG_INF
    top_ps = torch.tensor([0.9, 0.8, 0.95, 0.6, 0.8], device=device)
    assert min(_num_candidates(logits, top_ps)) > CAP
    got, want = _kept(logits, top_ps), _kept_exact(logits, top_ps)
    assert got[3].nonzero().flatten().tolist() == list(range(int(0.6 * vocab) + 1))
    assert not got[4, 1::3].any()
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_peaked_rows_and_extreme_top_p(device):
    """A dominant token, tiny top_p (only the top token, the lowest id among tied maxima),
    top_p = 1 (the whole row) and top_p just below 1."""
    vocab = 5000
    logits = torch.randn(6, vocab, device=device) * 12
    logits[0, 4321] = 1e4  # one-hot
    logits[1, [7, 900, 4000]] = logits[1].max() + 1  # three tied maxima
    top_ps = torch.tensor([0.999, 1e-6, 1.0, 0.9999, 1e-6, 0.5], device=device)
    got, want = _kept(logits, top_ps), _kept_exact(logits, top_ps)
    assert got[0].nonzero().flatten().tolist() == [4321]
    assert got[1].nonzero().flatten().tolist() == [7]
    assert got[2].all() and got[4].sum() == 1
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_negative_logits_and_signed_zeros(device):
    """The search orders int32 keys of the float bits: negative logits (flipped low bits) and
    -0.0 == +0.0 (one key, so such ties are kept in id order as the stable sort keeps them)."""
    vocab = 4000
    logits = torch.randn(4, vocab, device=device) * 3 - 100.0  # all negative
    zeros = torch.randint(0, 2, (vocab,), device=device).float() * -2 + 1  # +-1
    logits[1] = torch.where(torch.rand(vocab, device=device) < 0.5, 0.0, 1.0) * zeros * 0.0
    logits[1, :100] = 1.0  # boundary inside the run of mixed -0.0 / +0.0
    logits[2] = torch.randn(vocab, device=device).round() * 0.5  # ties across the sign
    logits[3, ::2] = -logits[3, ::2]  # mixed signs
    top_ps = torch.tensor([0.9, 0.5, 0.7, 0.95], device=device)
    assert (logits[1] == 0).sum() > 3000 and torch.signbit(logits[1]).sum() > 1000
    got, want = _kept(logits, top_ps), _kept_ref(logits, top_ps)
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_a_mixed_batch(device):
    """One launch over rows that take every path: candidates in the buffer, overflow to the
    whole row, ties, masks, a single live token, top_p 1 and tiny top_p."""
    from engine.kernels.top_p import CAP

    vocab = 2 * CAP + 123
    logits = torch.randn(8, vocab, device=device) * 3 / 0.8
    logits[1] = torch.randn(vocab, device=device) * 0.5  # overflow
    logits[2] = (logits[2] / 2).round()  # ties
    logits[3, : vocab // 2] = NEG_INF
    logits[4, :-1] = NEG_INF  # one live token
    logits[5] *= 4  # peaked
    top_ps = torch.tensor([0.9, 0.95, 0.8, 0.9, 0.5, 0.99, 1.0, 1e-6], device=device)
    counts = _num_candidates(logits, top_ps)
    assert counts[0] < CAP < counts[1], counts
    got, want = _kept(logits, top_ps), _kept_exact(logits, top_ps)
    assert got[4].nonzero().flatten().tolist() == [vocab - 1] and got[6].all()
    assert got[7].sum() == 1
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_top_p_next_to_one(device):
    """p within 1e-5..1e-7 of 1: the mass of the boundary tokens is a few float32 ulps of the
    row's, so the passes of the search may disagree by rounding (then the kernel keeps every
    token from the smallest one above the searched interval up); the kept set still differs from
    the exact nucleus only at tokens whose mass before them is within 1e-6 of p."""
    scales = torch.tensor([3.0, 8.0, 20.0], device=device).repeat_interleave(3)
    top_ps = torch.tensor([0.99999, 0.999999, 0.9999999], device=device).repeat(3)
    logits = torch.randn(len(top_ps), 3000, device=device) * scales[:, None]
    got, want = _kept(logits, top_ps), _kept_exact(logits, top_ps)
    assert got.any(dim=1).all(), "every row keeps at least its top token"
    for row in (got != want).any(dim=1).nonzero().flatten().tolist():
        probs = logits[row].cpu().double().softmax(-1)
        order = torch.sort(logits[row].cpu(), descending=True, stable=True).indices
        before = (probs[order].cumsum(0) - probs[order])[torch.argsort(order)]
        gaps = (before[got[row] != want[row]] - top_ps[row].item()).abs()
        assert gaps.max() < 1e-6, f"row {row}: mass before {gaps.max():.3g} away from p"


# --- the overflow path at interpreter sizes: a small buffer (cap) instead of a full vocabulary --


@pytest.mark.parametrize("cap", [64, 700])
def test_overflow_narrows_to_an_interval_that_fits(device, cap):
    """More candidates than `cap`: the whole-row passes stop once the tokens inside the key
    interval fit the buffer (the mass at/above it carried), then the buffer search finishes.
    Nearly uniform rows (randn * 0.02, as random weights give: the nucleus is ~90% of the row,
    far above cap), a boundary inside a run of ties (shorter than cap at 700, longer at 64: then
    the cut runs over the whole row), all tied, masked tokens, a peaked row whose candidates fit,
    top_p 1 and a tiny top_p on a flat row, a flat row with one low outlier (the value-split
    first pass gains nothing, key passes follow) and subnormal logits, all in one batch."""
    vocab = 3001
    logits = torch.randn(11, vocab, device=device) * 0.02
    logits[1] = torch.rand(vocab, device=device) * 0.01
    logits[2] = (logits[2] * 100).round()  # runs of ~120-600 equal logits
    logits[3] = 1.0  # all tied: exactly ceil(p * V) lowest ids
    logits[4, ::3] = NEG_INF
    logits[5] = torch.randn(vocab, device=device) * 12  # peaked
    logits[8, : vocab // 2] = NEG_INF
    logits[9] = torch.rand(vocab, device=device) * 0.01
    logits[9, 5] = -2.0  # one low candidate: the first (value-split) pass can't narrow
    logits[10] *= 1e-38  # subnormal and tiny logits: the keys span many binades around 0
    top_ps = torch.tensor([0.9, 0.6, 0.8, 0.6, 0.9, 0.9, 1.0, 1e-6, 0.95, 0.9, 0.5],
                          device=device)
    counts = _num_candidates(logits, top_ps)
    assert min(counts[:5] + counts[6:]) > cap and counts[5] < cap, counts
    got, want = _kept(logits, top_ps, cap), _kept_exact(logits, top_ps)
    assert got[3].nonzero().flatten().tolist() == list(range(int(0.6 * vocab) + 1))
    assert not got[4, ::3].any() and not got[8, : vocab // 2].any()
    assert got[6].all() and got[7].sum() == 1
    _assert_same_or_rounding(got, want, logits, top_ps)


@pytest.mark.parametrize("cap", [16, 200])
def test_overflow_with_the_boundary_in_ties(device, cap):
    """Quantized flat rows at a small buffer: the boundary falls inside a run of equal logits
    that fits the buffer (cap 200) or not (cap 16), on both sides of zero (signed keys); the
    lower ids win, as in the reference's stable sort."""
    vocab = 2000
    logits = (torch.randn(6, vocab, device=device) * 8).round() * 0.01
    logits[3:] -= 0.05  # the boundary runs among negative keys
    top_ps = torch.tensor([0.5, 0.7, 0.9, 0.33, 0.8, 0.999], device=device)
    assert min(_num_candidates(logits, top_ps)) > cap
    got, want = _kept(logits, top_ps, cap), _kept_exact(logits, top_ps)
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_cap_is_validated():
    from engine.kernels.top_p import top_p_cut

    with pytest.raises(ValueError, match="cap"):
        top_p_cut(torch.zeros(1, 8), torch.ones(1), cap=0)


# --- the split passes: per-chunk regions of the buffer, split narrowing, serial fallbacks ------

_FOUR_CHUNKS = 3 * 8192 + 500  # the split passes' chunks: 8192 tokens (the last one short here)
_TWO_CHUNKS = 8192 + 1500


def _chunk_candidates(logits: torch.Tensor, top_ps: torch.Tensor) -> list[list[int]]:
    """Per row, how many candidates (see `_num_candidates`) each chunk of the split passes has."""
    from engine.kernels.top_p import _STATS_CHUNK

    return [[int(c.sum()) for c in row.split(_STATS_CHUNK)] for row in _candidates(logits, top_ps)]


def _sparse_row(vocab: int, counts: list[int], generator: torch.Generator) -> torch.Tensor:
    """A row whose candidates are counts[j] random tokens of chunk j (randn logits), every other
    token far below the candidate bound."""
    from engine.kernels.top_p import _STATS_CHUNK

    row = torch.randn(vocab, generator=generator) * 0.5 - 40.0
    for j, count in enumerate(counts):
        size = min(_STATS_CHUNK, vocab - j * _STATS_CHUNK)
        ids = j * _STATS_CHUNK + torch.randperm(size, generator=generator)[:count]
        row[ids] = torch.randn(count, generator=generator)
    return row


def _boundary_ties(logits: torch.Tensor, kept: torch.Tensor) -> list[int]:
    """Per row, how many tokens share the smallest kept logit."""
    return [int((row == row[k].min()).sum()) for row, k in zip(logits.cpu(), kept)]


def test_chunk_regions_are_gathered_or_the_row_compacted_serially(device):
    """Candidates that fit the buffer (cap 400: 100 slots per chunk region) move from the
    chunks' regions into one prefix; a chunk with more candidates than its region sends its row
    to the serial compaction from that chunk on (the first chunk, a middle one after two
    gathered regions, the short last one); a region filled exactly is still gathered."""
    cap, region = 400, 100
    layouts = [[50, 60, 70, 40], [150, 0, 0, 50], [60, 70, 150, 50], [0, 100, 0, 100],
               [0, 0, 0, 300]]
    gen = torch.Generator().manual_seed(3)
    logits = torch.stack([_sparse_row(_FOUR_CHUNKS, c, gen) for c in layouts]).to(device)
    top_ps = torch.tensor([0.9, 0.5, 0.8, 0.95, 0.7], device=device)
    assert _chunk_candidates(logits, top_ps) == layouts
    assert [max(c) > region for c in layouts] == [False, True, True, False, True]
    got, want = _kept(logits, top_ps, cap), _kept_exact(logits, top_ps)
    _assert_same_or_rounding(got, want, logits, top_ps)


def test_rows_left_over_cap_after_the_split_passes_narrow_serially(device):
    """Rows whose interval still holds more than cap tokens after the split narrowing passes:
    the serial passes go on from the state the split passes left. A boundary inside a run of
    ties longer than cap (cut over the whole row), a flat row with one low outlier (the first,
    value-split pass gains nothing, so more key passes follow serially before the compaction),
    all tied (no pass at all), and a flat row at a tiny buffer."""
    cap, vocab = 16, _TWO_CHUNKS
    gen = torch.Generator().manual_seed(4)
    logits = torch.rand(4, vocab, generator=gen) * 0.01
    logits[0] = (torch.randn(vocab, generator=gen) * 4).round() * 0.01
    logits[1, 5] = -2.0
    logits[2] = 0.5
    logits[3] = torch.randn(vocab, generator=gen) * 0.02
    top_ps = torch.tensor([0.8, 0.9, 0.6, 0.9], device=device)
    logits = logits.to(device)
    got, want = _kept(logits, top_ps, cap), _kept_exact(logits, top_ps)
    assert _boundary_ties(logits, want)[0] > cap
    assert got[2].nonzero().flatten().tolist() == list(range(int(0.6 * vocab) + 1))
    _assert_same_or_rounding(got, want, logits, top_ps)


@pytest.mark.parametrize("narrow_to", [None, 40], ids=["at_cap", "narrow40"])
def test_a_batch_whose_rows_take_every_split_path(device, narrow_to):
    """One call, each row on its own path (cap 400: 200 slots per chunk region): gathered
    regions, a region overflow, overflow narrowed by the split passes (also with masked tokens,
    and down to a run of ties in one chunk: more than its region, so the narrowed interval is
    compacted serially), a low outlier (serial narrowing), top_p 1 (no work past the max/sum)
    and a peaked row; every row gets the reference's kept set."""
    cap, region, vocab = 400, 200, _TWO_CHUNKS
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(8, vocab, generator=gen) * 0.02
    logits[0] = _sparse_row(vocab, [150, 100], gen)
    logits[1] = _sparse_row(vocab, [80, 250], gen)
    logits[3, 8192:] = (logits[3, 8192:] * 75).round() * 0.01  # runs of ~300 equal logits ...
    logits[3, :8192] -= 5.0  # ... all in the second chunk; above them, 5 tokens of the first
    logits[3, 100:105] = 0.2
    logits[4, 5] = -2.0
    logits[5, ::2] = NEG_INF
    logits[7] *= 600  # peaked
    top_ps = torch.tensor([0.9, 0.8, 0.9, 0.8, 0.9, 0.9, 1.0, 0.9], device=device)
    logits = logits.to(device)
    counts = [sum(c) for c in _chunk_candidates(logits, top_ps)]
    assert max(counts[:2] + counts[7:]) <= cap < min(counts[2:7]), counts
    got, want = _kept(logits, top_ps, cap, narrow_to), _kept_exact(logits, top_ps)
    assert region < _boundary_ties(logits, want)[3] <= cap
    assert got[6].all() and not got[5, ::2].any()
    _assert_same_or_rounding(got, want, logits, top_ps)
