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


def _kept(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    from engine.kernels.top_p import apply_cut, top_p_cut

    thr, cut = top_p_cut(logits, top_ps)
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
def test_cut_equals_the_sorting_reference(device, vocab, scale):
    if device == "cpu" and vocab > 3001:
        pytest.skip("the interpreter is slow at this vocabulary")
    top_ps = torch.tensor([0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0], device=device)
    logits = torch.randn(len(top_ps), vocab, device=device) * scale
    got, want = _kept(logits, top_ps), _kept_ref(logits, top_ps)
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
    from engine.kernels import dispatch
    from engine.sampler import Sampler, SamplingTensors
    from engine.sampling_params import SamplingParams

    batch, vocab = 64, 128256
    logits = torch.randn(batch, vocab, device="cuda") * 3
    params = [SamplingParams(temperature=0.8, top_p=0.9) for _ in range(batch)]
    tensors = SamplingTensors.from_params(params, list(range(batch)), [3] * batch, None, vocab,
                                          "cuda")
    fast = Sampler()(logits, tensors).token_ids
    dispatch.use_triton(False)
    try:
        slow = Sampler()(logits, tensors).token_ids
    finally:
        dispatch.use_triton(True)
    assert torch.equal(fast, slow)
