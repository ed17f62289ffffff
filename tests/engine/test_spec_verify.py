"""Speculative decoding's verification (engine/spec/rejection.py) and n-gram proposer.

Greedy verification emits plain greedy's tokens exactly. Sampled verification keeps the target
distribution: with fixed target logits, the first emitted token over many seeds follows the
target's (processed) distribution by a chi-square test, for point-mass drafts (n-gram) and for
drafts sampled from another distribution q (a draft model), and the second token, given the
first draft was kept, follows the next row's distribution. Fixed seeds: deterministic."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import SamplingTensors, sampling_logits
from engine.sampling_params import SamplingParams
from engine.spec.ngram import NgramConfig, NgramProposer
from engine.spec.rejection import row_layout, verify

V = 6
DRAWS = 20_000
CHI2_DF5_P001 = 20.52  # chi-square critical value, 5 degrees of freedom, p = 0.001


def _tensors(params: list[SamplingParams], steps: list[int], seeds: list[int],
             histories=None) -> SamplingTensors:
    return SamplingTensors.from_params(params, seeds, steps, histories, V, "cpu")


def _chi2(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=V).double()
    expected = probs.double() * samples.numel()
    live = expected > 0
    assert counts[~live].sum() == 0, "a token outside the support was emitted"
    return float(((counts[live] - expected[live]) ** 2 / expected[live]).sum())


def test_greedy_verification_is_plain_greedy():
    torch.manual_seed(0)
    logits = torch.randn(8, V)
    best = logits.argmax(-1).tolist()
    # request 0 (rows 0-3): drafts right, right, wrong -> 2 kept, then the correction at row 2
    # request 1 (row 4): no drafts -> its greedy token; request 2 (rows 5-7): both right -> bonus
    wrong = (best[2] + 1) % V
    drafts = torch.tensor([best[0], best[1], wrong, -1, -1, best[5], best[6], -1])
    params = [SamplingParams(temperature=0.0)] * 8
    out = verify(logits, _tensors(params, list(range(8)), [1] * 8), drafts, [3, 0, 2])
    assert out.num_emitted.tolist() == [3, 1, 3]
    assert out.token_ids.tolist() == [[best[0], best[1], best[2], -1],
                                      [best[4], -1, -1, -1],
                                      [best[5], best[6], best[7], -1]]


def test_layout_and_bad_counts():
    index, is_draft = row_layout([2, 0], "cpu")
    assert index.tolist() == [[0, 1, 2], [3, 0, 0]]
    assert is_draft.tolist() == [[True, True, False], [False, False, False]]
    with pytest.raises(ValueError, match="rows"):
        verify(torch.zeros(2, V), _tensors([SamplingParams()] * 2, [0, 1], [0, 0]),
               torch.tensor([1, -1]), [2])


def _target(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    tensors = _tensors([params], [0], [0])
    return sampling_logits(logits[None].float(), tensors).softmax(-1)[0]


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.7, top_p=0.8),
                                    SamplingParams(temperature=1.3, top_k=4)])
def test_point_mass_drafts_keep_the_target_distribution(params):
    torch.manual_seed(1)
    row0, row1 = torch.randn(V) * 1.5, torch.randn(V) * 1.5
    draft0, draft1 = int(row0.argmax()), int(row1.argsort()[-2])  # likely, and less likely
    logits = torch.stack([row0, row1, torch.randn(V)]).repeat(DRAWS, 1)
    drafts = torch.tensor([draft0, draft1, -1]).repeat(DRAWS)
    seeds = [s for s in range(DRAWS) for _ in range(3)]
    tensors = _tensors([params] * (3 * DRAWS), [0, 1, 2] * DRAWS, seeds)
    out = verify(logits, tensors, drafts, [2] * DRAWS)
    first = out.token_ids[:, 0]
    assert _chi2(first, _target(params, row0)) < CHI2_DF5_P001
    second = out.token_ids[first == draft0, 1]  # given the first draft was kept
    assert second.numel() > 1000
    assert _chi2(second, _target(params, row1)) < CHI2_DF5_P001


def test_sampled_drafts_keep_the_target_distribution():
    """A draft model's q: drafts drawn from q, kept with min(1, p/q), else the residual."""
    torch.manual_seed(2)
    target_row, q_row = torch.randn(V), torch.randn(V)
    q = q_row.softmax(-1)
    gen = torch.Generator().manual_seed(3)
    draws = torch.multinomial(q, DRAWS, replacement=True, generator=gen)
    logits = torch.stack([target_row, torch.randn(V)]).repeat(DRAWS, 1)
    drafts = torch.stack([draws, torch.full_like(draws, -1)], 1).reshape(-1)
    draft_probs = torch.stack([q, torch.full((V,), 1.0 / V)]).repeat(DRAWS, 1)
    params = SamplingParams(temperature=1.0)
    tensors = _tensors([params] * (2 * DRAWS), [5, 6] * DRAWS,
                       [s for s in range(DRAWS) for _ in range(2)])
    out = verify(logits, tensors, drafts, [1] * DRAWS, draft_probs)
    assert _chi2(out.token_ids[:, 0], target_row.softmax(-1)) < CHI2_DF5_P001
    kept = out.num_emitted == 2
    assert 0 < kept.sum() < DRAWS  # some drafts kept, some rejected


def test_all_mass_on_the_draft_always_keeps_it():
    """top-p leaves only the draft: it is kept even if rounding puts p(draft) just below 1."""
    logits = torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * V])
    params = [SamplingParams(temperature=1.0, top_p=0.5)] * 2
    for seed in range(50):
        out = verify(logits, _tensors(params, [0, 1], [seed, seed]), torch.tensor([0, -1]), [1])
        assert out.token_ids[0, 0] == 0 and out.num_emitted[0] == 2


def test_logprobs_are_under_the_raw_logits():
    torch.manual_seed(4)
    logits = torch.randn(3, V)
    best = logits.argmax(-1)
    params = [SamplingParams(temperature=0.0, logprobs=True)] * 3
    out = verify(logits, _tensors(params, [0, 1, 2], [0] * 3),
                 torch.tensor([int(best[0]), int(best[1]), -1]), [2])
    want = logits.log_softmax(-1).gather(1, best[:, None]).squeeze(1)
    assert torch.allclose(out.logprobs[0], want)


def test_ngram_proposer_finds_the_latest_longest_match():
    proposer = NgramProposer(NgramConfig(num_speculative_tokens=3, max_ngram=3))
    assert proposer.propose([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 1, 2, 3]) == [7, 8, 1]
    assert proposer.propose([5, 6, 7, 5, 6]) == [7, 5, 6]
    assert proposer.propose([1, 2, 3, 4]) == []
    assert proposer.propose([4, 1, 2, 4], max_tokens=1) == [1]
    assert proposer.propose([4]) == []
    with pytest.raises(ValueError, match="min_ngram"):
        NgramConfig(min_ngram=3, max_ngram=2)
