"""Top-p draws that run the cut only where the whole row's race winner is not surely in the
nucleus (engine/kernels/top_p_race.py): the ids of the race on the cut's bounds, bit for bit,
for rows decided either way, and rows at the margin sent to the cut."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

VOCAB = 9001  # two chunks of the split passes, the second ragged


def _batch(device: str, batch: int, vocab: int = VOCAB, scale: float = 2.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=generator) * scale
    logits[1, ::7] = float("-inf")  # masked tokens
    logits[2, : vocab // 2] = logits[2, 0]  # half the row tied
    logits[3] = logits[3].round()  # many ties at every logit
    temps = torch.rand(batch, generator=generator) * 1.5 + 0.3
    seeds = torch.randint(0, 2**62, (batch,), generator=generator)
    steps = torch.randint(0, 10_000, (batch,), generator=generator)
    return [t.to(device) for t in (logits, temps, seeds, steps)]


def _want(logits, seeds, steps, top_ps, temps):
    from engine.kernels.sampling import sample_race
    from engine.kernels.top_p import top_p_cut

    bounds = top_p_cut(logits, top_ps, temperatures=temps)
    return sample_race(logits, seeds, steps, bounds, temps).cpu()


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_draws_equal_the_race_on_the_cut(device, scale):
    """Flat and peaked rows, top_p from 0.05 to 1, several steps of noise: every id is the
    cut-then-race id; on flat rows both kinds of row occur."""
    from engine.kernels.top_p_race import draws_and_done

    logits, temps, seeds, steps = _batch(device, 8, scale=scale)
    top_ps = torch.tensor([0.9, 0.5, 0.95, 0.99, 0.3, 1.0, 0.05, 0.6], device=device)
    decided = 0
    for step in range(3):
        got, done = draws_and_done(logits, seeds, steps + step, top_ps, temps)
        assert torch.equal(got.cpu(), _want(logits, seeds, steps + step, top_ps, temps))
        assert bool(done[5])  # top_p 1: the whole row's winner, no cut
        decided += int(done.sum())
    assert decided > 0
    if scale == 1.0:  # flat rows: some winners fall outside the nucleus and need the cut
        assert decided < 3 * 8


def _mass_before(row: torch.Tensor, winner: int) -> float:
    """The exact mass before `winner` in the stable descending order (float64)."""
    probs = torch.softmax(row.double(), dim=0)
    x = row[winner]
    ids = torch.arange(row.numel(), device=row.device)
    before = (row > x) | ((row == x) & (ids < winner))
    return float(probs[before].sum())


@pytest.mark.parametrize("offset, decided", [(-5e-5, False), (5e-5, False), (5e-3, True),
                                             (-5e-3, False)])
def test_rows_near_the_boundary_run_the_cut(device, offset, decided):
    """top_p set just above / below the winner's mass before it: within the margin (1e-4)
    the row runs the cut, whichever side the winner is on; far inside the race decides."""
    from engine.kernels.top_p_race import draws_and_done
    from engine.sampler import sample_race_ref

    logits, temps, seeds, steps = _batch(device, 4, scale=1.0, seed=3)
    tempered = logits / temps[:, None]
    winners, top_ps = [], []
    for b in range(4):  # a step whose winner has between 5% and 95% of the mass before it
        for step in range(int(steps[b]), int(steps[b]) + 100):
            winner = int(sample_race_ref(tempered[b:b + 1], seeds[b:b + 1],
                                         torch.tensor([step], device=device))[0])
            if 0.05 < _mass_before(tempered[b], winner) < 0.95:
                break
        steps[b] = step
        winners.append(winner)
        top_ps.append(_mass_before(tempered[b], winner) + offset)
    winners = torch.tensor(winners)
    top_ps = torch.tensor(top_ps, device=device)
    got, done = draws_and_done(logits, seeds, steps, top_ps, temps)
    assert torch.equal(got.cpu(), _want(logits, seeds, steps, top_ps, temps))
    assert done.tolist() == [decided] * 4
    if offset < 0:  # the winner is outside the nucleus: the cut's race picks another token
        assert not torch.equal(got.cpu(), winners.cpu())


def test_rows_with_nan_read_in_bounds_and_match_the_cut(device):
    """A row holding NaN (a broken model output) has no race winner; the mass pass must not
    read past the row, and the ids are whatever the cut-then-race path gives."""
    from engine.kernels.top_p_race import draws_and_done

    logits, temps, seeds, steps = _batch(device, 4, vocab=3001)
    logits[0, 17] = float("nan")
    logits[2] = float("nan")
    top_ps = torch.tensor([0.9, 0.9, 0.9, 1.0], device=device)
    got, done = draws_and_done(logits, seeds, steps, top_ps, temps)
    want = _want(logits, seeds, steps, top_ps, temps)
    assert torch.equal(got.cpu()[1:], want[1:])  # the all-NaN row goes to the cut
    assert 0 <= int(got[0]) < 3001  # one NaN token: a valid id (IEEE max may skip NaN)
