"""The temperature divided inside the top-p and race kernels (engine/kernels/top_p.py,
engine/kernels/sampling.py) instead of on a tempered copy: the same cut and the same draws,
bit for bit, as on `logits / temperatures[:, None]` made by torch. The division rounds to
nearest in both (IEEE), so any difference here is a kernel that divides approximately."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

TEMPS = [0.3, 0.7, 0.8, 1.0, 1.3, 1.7, 2.9, 0.05]


def _rows(device: str, vocab: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(len(TEMPS), vocab) * scale
    logits[1, ::5] = float("-inf")  # masked tokens stay masked after the division
    logits[2, :vocab // 3] = logits[2, 0]  # a third of the row tied
    return logits.to(device), torch.tensor(TEMPS, device=device)


@pytest.mark.parametrize("scale", [0.5, 3.0])
@pytest.mark.parametrize("narrow_to", [None, 24], ids=["default", "narrow24"])
def test_cut_of_tempered_rows_without_the_copy(device, scale, narrow_to):
    """The cut with `temperatures` is the cut of torch's tempered copy: the same boundary
    logit and last kept id in every row (narrow24: the split narrowing passes run too)."""
    from engine.kernels.top_p import CAP, NARROW_TO, top_p_cut

    logits, temps = _rows(device, 3001, scale)
    top_ps = torch.tensor([0.9, 0.5, 0.95, 0.99, 0.3, 0.9, 0.8, 0.999], device=device)
    limits = dict(cap=CAP, narrow_to=narrow_to or NARROW_TO)
    thr, cut = top_p_cut(logits, top_ps, temperatures=temps, **limits)
    want_thr, want_cut = top_p_cut(logits / temps[:, None], top_ps, **limits)
    assert torch.equal(thr.cpu(), want_thr.cpu())
    assert torch.equal(cut.cpu(), want_cut.cpu())


def test_race_of_tempered_rows_without_the_copy(device):
    """The race with `temperatures` (with and without a top-p cut) picks what it picks from
    torch's tempered copy, over several steps of noise."""
    from engine.kernels.sampling import sample_race
    from engine.kernels.top_p import top_p_cut

    logits, temps = _rows(device, 4099, 3.0)
    tempered = logits / temps[:, None]
    top_ps = torch.full((len(TEMPS),), 0.9, device=device)
    seeds = torch.randint(0, 2**62, (len(TEMPS),), device=device)
    steps = torch.randint(0, 1000, (len(TEMPS),), device=device)
    bounds = top_p_cut(logits, top_ps, temperatures=temps)
    for step in range(3):
        got = sample_race(logits, seeds, steps + step, None, temps).cpu()
        assert torch.equal(got, sample_race(tempered, seeds, steps + step).cpu())
        got = sample_race(logits, seeds, steps + step, bounds, temps).cpu()
        assert torch.equal(got, sample_race(tempered, seeds, steps + step, bounds).cpu())


def test_temperatures_must_have_one_per_row(device):
    from engine.kernels.top_p import top_p_cut

    with pytest.raises(ValueError, match="temperatures"):
        top_p_cut(torch.zeros(2, 8, device=device), torch.ones(2, device=device),
                  temperatures=torch.ones(3, device=device))


def sampler_ids_with_and_without_triton(logits: torch.Tensor, params: list
                                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Sampler's ids for `params` (one per row) on CUDA: Triton kernels on, then the torch
    path (tempered copy, sorting top-p) on the same noise."""
    from engine.kernels import dispatch
    from engine.sampler import Sampler, SamplingTensors

    batch, vocab = logits.shape
    tensors = SamplingTensors.from_params(params, list(range(batch)), [5] * batch, None, vocab,
                                          "cuda")
    fast = Sampler()(logits, tensors).token_ids
    dispatch.use_triton(False)
    try:
        slow = Sampler()(logits, tensors).token_ids
    finally:
        dispatch.use_triton(True)
    return fast, slow


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_on_cuda_divides_in_the_kernels(cuda, top_p):
    """Temperature-only and temperature + top-p rows through the Sampler on CUDA (the
    kernels divide) give the ids of the torch path (a tempered copy, the sorting top-p)."""
    from engine.sampling_params import SamplingParams

    batch = 32
    params = [SamplingParams(temperature=TEMPS[i % len(TEMPS)], top_p=top_p)
              for i in range(batch)]
    fast, slow = sampler_ids_with_and_without_triton(
        torch.randn(batch, 128256, device="cuda") * 2, params)
    assert torch.equal(fast, slow)
