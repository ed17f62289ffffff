"""The fused sampling race (engine/kernels/sampling.py) against the torch reference
`sample_race_ref`: same noise bit for bit (integer hash), same picks except where two keys are
within float rounding of each other (checked explicitly), lowest id on exact ties, masked ids
never picked, and the Sampler on CUDA routed through it."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import Sampler, SamplingTensors, sample_race_ref, uniform_noise
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def _keys(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    noise = uniform_noise(seeds.cpu(), steps.cpu(), logits.shape[1]).double()
    return logits.cpu().double() - (-noise.log()).log()


def _assert_same_or_near_tie(got, want, logits, seeds, steps):
    keys = _keys(logits, seeds, steps)
    for row in (got != want).nonzero().flatten().tolist():
        a, b = keys[row, got[row]].item(), keys[row, want[row]].item()
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"row {row}: {got[row]} vs {want[row]}"


@pytest.mark.parametrize("batch,vocab", [(1, 128256), (3, 1000), (64, 4099), (5, 1024), (2, 7)])
def test_race_matches_reference(device, batch, vocab):
    from engine.kernels.sampling import sample_race

    logits = torch.randn(batch, vocab, device=device) * 4
    seeds = torch.randint(0, 2**63 - 1, (batch,), device=device)
    steps = torch.randint(0, 10_000, (batch,), device=device)
    got = sample_race(logits, seeds, steps).cpu()
    want = sample_race_ref(logits.cpu(), seeds.cpu(), steps.cpu())
    assert got.dtype == torch.int64 and got.shape == (batch,)
    _assert_same_or_near_tie(got, want, logits, seeds, steps)


def test_flat_logits_pick_the_largest_uniform(device):
    """With equal logits the race is decided by the noise alone: the pick is the id of the
    largest uniform (the first on a tie), so this pins the kernel's hash to uniform_noise's."""
    from engine.kernels.sampling import sample_race

    seeds = torch.tensor([0, 1234, 2**63 - 1, 77], device=device)
    steps = torch.tensor([0, 5, 7, 123456], device=device)
    got = sample_race(torch.zeros(4, 50_000, device=device), seeds, steps).cpu()
    assert got.tolist() == uniform_noise(seeds.cpu(), steps.cpu(), 50_000).argmax(-1).tolist()


def test_masked_ids_never_win_and_a_fully_masked_row_gives_zero(device):
    from engine.kernels.sampling import sample_race

    logits = torch.full((3, 5000), float("-inf"), device=device)
    logits[0, 4321] = 0.0
    logits[1, [3, 4999]] = 5.0
    seeds, steps = torch.arange(3, device=device), torch.zeros(3, dtype=torch.int64, device=device)
    got = sample_race(logits, seeds, steps).tolist()
    assert got[0] == 4321 and got[1] in (3, 4999) and got[2] == 0


def test_race_applies_a_top_p_cut_as_it_reads(device):
    """The race with a top-p cut's bounds picks exactly what it picks from the masked copy
    `apply_cut` makes: same kernel arithmetic, the mask applied in registers. Rows with ties
    at the boundary, masked tokens and top_p = 1."""
    from engine.kernels.sampling import sample_race
    from engine.kernels.top_p import apply_cut, top_p_cut

    gen = torch.Generator().manual_seed(11)
    logits = (torch.randn(6, 4099, generator=gen) * 4).round() / 2  # many ties
    logits[2, ::3] = float("-inf")
    logits, top_ps = logits.to(device), torch.tensor([0.9, 0.5, 0.95, 1.0, 0.1, 0.999],
                                                      device=device)
    seeds = torch.randint(0, 2**63 - 1, (6,), generator=gen).to(device)
    steps = torch.randint(0, 10_000, (6,), generator=gen).to(device)
    for step in range(4):
        bounds = top_p_cut(logits, top_ps)
        got = sample_race(logits, seeds, steps + step, bounds).cpu()
        want = sample_race(apply_cut(logits, *bounds), seeds, steps + step).cpu()
        assert torch.equal(got, want)
        kept = apply_cut(logits, *bounds).cpu()
        assert torch.isfinite(kept[torch.arange(6), got]).all()


def test_sampler_routes_cuda_draws_through_the_kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=i) for i in range(8)]
    tensors = SamplingTensors.from_params(params, list(range(8)), [3] * 8, None, 32000, "cuda")
    logits = torch.randn(8, 32000, device="cuda") * 3
    from engine.kernels import dispatch

    fused = Sampler()(logits, tensors).token_ids.cpu()
    dispatch.use_triton(False)
    try:
        reference = Sampler()(logits, tensors).token_ids.cpu()
    finally:
        dispatch.use_triton(True)
    # top-k / top-p masks are identical; only the race differs in rounding
    assert (fused == reference).float().mean() >= 7 / 8
