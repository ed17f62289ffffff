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

    def wants_drafts(self, batch: int, from_shadow: bool = False) -> bool:
        self.decisions.append(super().wants_drafts(batch, from_shadow))
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
    outs = [o.prompt_token_ids + o.token_ids for o in engine.generate(_prompts(8), params)]
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
    return outs, payoff.decisions


def _probes(decisions: list[bool]) -> int:
    """Drafting steps after the first plain one."""
    return sum(decisions[decisions.index(False):])


def test_no_drafting_step_at_acceptance_zero_with_shadow_drafts(model):  # noqa: F811
    """At acceptance 0 and a slower verification step, the engine without shadow drafts
    drafts first and then probes drafting again and again (16, then 32 steps later); with
    them it never drafts, not even at the start. Outputs are plain greedy's either way."""
    plain, decisions = _drafting_steps(model, WrongDrafts())
    shadowed, shadow_decisions = _drafting_steps(model, WrongDraftsWithShadow())
    assert shadowed == plain
    assert decisions[0] and _probes(decisions) >= 2, decisions
    assert not any(shadow_decisions), shadow_decisions


class RightDraftsWithShadow:
    """Drafts the known continuation (acceptance 1) of each sequence, on the host."""

    def __init__(self, references: list[list[int]]) -> None:
        self.references = references

    def propose(self, token_ids, max_tokens=None):
        n = len(token_ids)
        for ref in self.references:
            if ref[:n] == list(token_ids):
                return ref[n:n + min(3, max_tokens or 3)]
        return []

    shadow_propose = propose

    def fill(self, chunks) -> None:
        pass


def test_shadow_drafts_start_drafting_once_they_would_be_kept(model):  # noqa: F811
    """With shadow drafts that would all be kept, drafting starts after the first shadow
    score (passes every step until then: a few steps, not the every-4 cadence), and the
    outputs stay plain greedy's."""
    plain, _ = _drafting_steps(model, WrongDrafts())
    outs, decisions = _drafting_steps(model, RightDraftsWithShadow(plain))
    assert outs == plain
    first = decisions.index(True)
    assert 1 <= first <= 6, decisions
    assert sum(decisions) >= 10, decisions


def test_payoff_from_shadow_waits_for_a_shadow_score():
    payoff = Payoff(probe_every=4, max_probe_every=16, min_shadow_acceptance=0.1)
    assert payoff.needs_shadow(8)
    assert not any(payoff.wants_drafts(8, from_shadow=True) for _ in range(3))
    payoff.record_acceptance(8, 30, 1, shadow=True)  # 0.03: would not pay
    assert not payoff.needs_shadow(8)
    assert not any(payoff.wants_drafts(8, from_shadow=True) for _ in range(40))
    for _ in range(4):
        payoff.record_acceptance(8, 30, 20, shadow=True)
    assert payoff.wants_drafts(8, from_shadow=True)  # now it tries drafting
    payoff.record(8, True, 30, 1.0)
    assert not payoff.wants_drafts(8, from_shadow=True)  # then measures plain decoding
    assert payoff.needs_shadow(64)  # another batch size waits for its own score
    quiet = Payoff(probe_every=4)
    for _ in range(5):
        quiet.wants_drafts(8, from_shadow=True)
    assert not quiet.needs_shadow(8)  # no score within its first steps: the cadence resumes
