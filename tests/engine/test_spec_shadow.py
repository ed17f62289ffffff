"""Shadow drafts (engine/spec/shadow.py): while plain decoding wins, drafts made on the host
are scored against the tokens plain decoding then produces, and `Payoff` skips its probes of
drafting while they accept no more than the verified drafts did (except at the largest gap), so
speculation at acceptance 0 stops costing early probe steps; when the shadow acceptance rises,
probing resumes."""

from __future__ import annotations

from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.spec.payoff import Payoff
from engine.spec.shadow import ShadowDrafts, matched_prefix
from tests.engine.test_spec_decoding import _prompts, model  # noqa: F401 (fixture)


def _request(rid: str, prompt: list[int], max_tokens: int = 32) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), seed=0,
                   max_model_len=256)


def test_shadow_drafts_score_what_verification_would_keep():
    """A draft is scored once its request has tokens at all its positions: the matched
    prefix, as verification would keep it; a request that left the batch drops its draft."""
    assert matched_prefix([1, 2, 3], [1, 2, 4]) == 2 and matched_prefix([5], [6]) == 0
    shadow = ShadowDrafts(room=lambda r: 3, every=2)
    a, b = _request("a", [9, 9, 9]), _request("b", [8, 8])
    propose = lambda tokens, room: [7, 7, 7][:room]  # noqa: E731
    assert shadow.step([a, b], propose) == (0, 0)  # between passes
    assert shadow.step([a, b], propose) == (0, 0) and shadow.num_pending == 2  # drafted
    a.output_token_ids += [7, 7, 1]  # a: two of three drafts right
    b.output_token_ids += [7]  # b: not all positions decoded yet
    assert shadow.step([a, b], propose) == (0, 0)
    assert shadow.step([a, b], propose) == (3, 2) and shadow.num_pending == 2  # a re-drafted
    assert shadow.step([a], propose) == (0, 0)
    assert shadow.step([a], propose) == (0, 0) and shadow.num_pending == 1  # b dropped


def test_payoff_skips_probes_of_drafting_while_shadow_acceptance_is_no_higher():
    payoff = Payoff(probe_every=4, max_probe_every=16)
    assert payoff.wants_drafts(8)
    payoff.record(8, True, 10, 1.0)  # drafting: slow, nothing accepted
    payoff.record_acceptance(8, 24, 0, shadow=False)
    assert not payoff.wants_drafts(8)
    payoff.record(8, False, 20, 1.0)
    payoff.record_acceptance(8, 30, 1, shadow=True)  # shadow drafts: still nothing kept
    choices = [payoff.wants_drafts(8) for _ in range(64)]
    probes = [i for i, c in enumerate(choices) if c]
    assert probes == [28, 44, 60]  # the probes after 4 and 8 steps skipped; at the largest
    # gap (16) they still run (verification may have got cheaper)
    for _ in range(8):
        payoff.record_acceptance(8, 30, 27, shadow=True)  # now drafts would be kept
    assert payoff.acceptance(8)[True] > 0.8
    assert any(payoff.wants_drafts(8) for _ in range(17))  # the next due probe runs
    unaware = Payoff(probe_every=4, max_probe_every=16)  # no shadow data: probes as before
    unaware.wants_drafts(8)
    unaware.record(8, True, 10, 1.0)
    unaware.wants_drafts(8)
    unaware.record(8, False, 20, 1.0)
    assert sum(unaware.wants_drafts(8) for _ in range(64)) >= 4


class WrongDrafts:
    """Drafts that are always wrong (acceptance 0), on the host."""

    def propose(self, token_ids, max_tokens=None):
        return [(token_ids[-1] + 1 + i) % 300 for i in range(min(3, max_tokens or 3))]

    def fill(self, chunks) -> None:
        pass


class WrongDraftsWithShadow(WrongDrafts):
    shadow_propose = WrongDrafts.propose


class CountingPayoff(Payoff):
    """The engine's Payoff with step times fixed (a verification step costs twice a plain
    one), counting its decisions."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions: list[bool] = []

    def wants_drafts(self, batch: int) -> bool:
        self.decisions.append(super().wants_drafts(batch))
        return self.decisions[-1]

    def record(self, batch, speculative, tokens, seconds):
        super().record(batch, speculative, tokens, 2.0 if speculative else 1.0)


def _drafting_steps(model: str, proposer) -> tuple[list, int]:
    engine = LLMEngine(EngineConfig(
        model=model, device="cpu", attention_backend="torch",
        cache=CacheConfig(block_size=4, num_blocks=512),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512),
        speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3,
                                      max_batch_size=16)))
    engine.spec.proposer = proposer
    engine.spec.payoff = payoff = CountingPayoff()
    engine.spec.shadow.every = 4
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
    outs = [o.token_ids for o in engine.generate(_prompts(8), params)]
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
    first_plain = payoff.decisions.index(False)
    return outs, sum(payoff.decisions[first_plain:])


def test_no_probe_steps_at_acceptance_zero_with_shadow_drafts(model):  # noqa: F811
    """At acceptance 0 and a slower verification step, the engine probes drafting again and
    again without shadow drafts (16, then 32 steps later), and not once with them; outputs
    are plain greedy's either way."""
    plain, probes = _drafting_steps(model, WrongDrafts())
    shadowed, shadow_probes = _drafting_steps(model, WrongDraftsWithShadow())
    assert shadowed == plain
    assert probes >= 2 and shadow_probes == 0, (probes, shadow_probes)
