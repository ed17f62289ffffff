"""The oracle-draft speculative benchmark (benchmarks/spec_oracle.py): its proposer drafts the
reference at the acceptance rate it is given, and a tiny CPU dry run through two real engines
(asynchronous scheduling on) measures what the oracle set: every draft kept at p = 1, none at
p = 0, outputs identical to plain decoding."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.spec_oracle import (OracleBenchConfig, build_engines, main, make_prompts,
                                    measure, references)
from benchmarks.spec_oracle_proposer import (KEY_TOKENS, OracleProposer, expected_tokens,
                                              implied_acceptance, keep_fraction)

VOCAB = 1000
PROMPTS = [list(range(100 + 20 * i, 120 + 20 * i)) for i in range(3)]
REFS = [[(7 * i + j) % VOCAB for j in range(12)] for i in range(3)]


def _oracle(p: float, k: int = 3) -> OracleProposer:
    oracle = OracleProposer(k, p, VOCAB, seed=5)
    oracle.load(PROMPTS, REFS)
    return oracle


def test_full_acceptance_drafts_the_reference_up_to_its_end_and_max_tokens() -> None:
    oracle = _oracle(1.0)
    assert oracle.propose(PROMPTS[1] + REFS[1][:4]) == REFS[1][4:7]
    assert oracle.propose(PROMPTS[1] + REFS[1][:10]) == REFS[1][10:12]  # the reference ends
    assert oracle.propose(PROMPTS[2] + REFS[2][:2], max_tokens=1) == REFS[2][2:3]
    assert oracle.propose(PROMPTS[0] + REFS[0]) == []
    assert oracle.counters.num_proposals == 3 and oracle.counters.num_short_proposals == 2
    assert not oracle.counters.diverged


def test_zero_acceptance_drafts_only_wrong_tokens() -> None:
    drafts = _oracle(0.0).propose(PROMPTS[0] + REFS[0][:3])
    assert len(drafts) == 3 and all(d != r for d, r in zip(drafts, REFS[0][3:6]))


def test_keep_decisions_are_seeded_per_position_at_rate_p() -> None:
    kept = [keep_fraction(5, 2, pos) < 0.7 for pos in range(20000)]
    assert abs(sum(kept) / len(kept) - 0.7) < 0.015
    assert kept == [keep_fraction(5, 2, pos) < 0.7 for pos in range(20000)]
    assert kept != [keep_fraction(6, 2, pos) < 0.7 for pos in range(20000)]
    a, b = _oracle(0.5), _oracle(0.5)
    assert a.propose(PROMPTS[0] + REFS[0][:5]) == b.propose(PROMPTS[0] + REFS[0][:5])


def test_shadow_drafts_equal_the_drafts_and_count_nothing() -> None:
    """The engine's shadow drafts (engine/spec/shadow.py) are what `propose` would draft, and
    leave the counters and divergence marks, which score verified drafts, untouched."""
    oracle = _oracle(0.5)
    shadow = oracle.shadow_propose(PROMPTS[2] + REFS[2][:3])
    off = PROMPTS[0] + REFS[0][:1] + [(REFS[0][1] + 1) % VOCAB]
    assert oracle.shadow_propose(off) == [] and oracle.shadow_propose(PROMPTS[1], 2) == \
        _oracle(0.5).propose(PROMPTS[1], 2)
    assert oracle.counters.num_proposals == 0 and not oracle.counters.diverged
    assert shadow == oracle.propose(PROMPTS[2] + REFS[2][:3]) and len(shadow) == 3


def test_a_diverged_or_unknown_sequence_gets_no_drafts() -> None:
    oracle = _oracle(1.0)
    off = REFS[0][:2] + [(REFS[0][2] + 1) % VOCAB]
    assert oracle.propose(PROMPTS[0] + off) == []
    assert oracle.counters.diverged == {0: 2}
    assert oracle.propose(PROMPTS[0] + REFS[0][:3]) == []  # stays off for the run
    assert oracle.propose(list(range(500, 500 + KEY_TOKENS + 4))) == []
    assert oracle.counters.num_unknown == 1
    with pytest.raises(ValueError, match="prompts"):
        oracle.load([PROMPTS[0], PROMPTS[0]], REFS[:2])


def test_tiny_dry_run_measures_the_acceptance_it_was_given(tmp_path) -> None:
    out = tmp_path / "spec_oracle_cpu.json"
    main(["--device", "cpu", "--tiny", "--batches", "1,4", "--acceptances", "0.0,1.0",
          "--ks", "3", "--repeats", "1", "--random-check", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert {"config", "engine", "device", "commit", "rows", "skipped"} <= payload.keys()
    assert payload["engine"]["async_scheduling"] and not payload["skipped"]
    rows = {(r["batch"], r["p"], r["weights"]): r for r in payload["rows"]}
    assert set(rows) == {(1, 0.0, "chain"), (1, 1.0, "chain"), (4, 0.0, "chain"),
                         (4, 1.0, "chain"), (4, 0.9, "random")}
    for (batch, p, _), row in rows.items():
        assert row["spec_outputs_identical"] == [batch] == row["plain_outputs_identical"]
        assert row["diverged_requests"] == [0]
        assert row["plain_tok_s"] > 0 and row["spec_tok_s"] > 0 and row["speedup"] > 0
        assert row["verifications"] == row["oracle_proposals"]
        if p == 1.0:
            assert row["acceptance_rate"] == 1.0
            assert row["accepted_tokens"] == row["draft_tokens"]
            # k + 1 tokens per verification but for one short one per request at its end
            assert row["oracle_short_proposals"] <= batch
            full = row["verifications"] - row["oracle_short_proposals"]
            assert row["accepted_tokens"] >= 3 * full
            assert row["verifications"] > 0
        elif p == 0.0:  # shadow drafts accept nothing: no step drafts (engine/spec/payoff.py)
            assert row["verifications"] == row["draft_tokens"] == 0
            assert row["mean_tokens_per_verification"] == 1.0


def test_dry_run_asserts_outputs_equal_the_reference() -> None:
    cfg = OracleBenchConfig(device="cpu", tiny=True, batches=(2,), acceptances=(1.0,), ks=(2,),
                            prompt_tokens=32, max_tokens=8, repeats=1)
    plain, spec = build_engines(cfg)
    prompts = make_prompts(cfg, 2)
    reference = references(cfg, plain, spec, prompts)
    wrong = [[(t + 1) % cfg.model_config.vocab_size for t in ref] for ref in reference]
    with pytest.raises(AssertionError, match="differ from plain"):
        measure(cfg, plain, spec, prompts, wrong, 2, 1.0)
    row = measure(cfg, plain, spec, prompts, reference, 2, 1.0)
    assert row["acceptance_rate"] == 1.0 and row["spec_outputs_identical"] == [2]
    assert plain.kv_manager.is_idle() and spec.kv_manager.is_idle()


def test_implied_acceptance_inverts_the_expected_tokens() -> None:
    for p in (0.0, 0.5, 0.7, 0.9):
        assert implied_acceptance(expected_tokens(p, 3), 3) == pytest.approx(p, abs=1e-6)
    assert implied_acceptance(5.0, 4) == pytest.approx(1.0, abs=1e-6)


def test_chain_weights_decode_a_permutation_chain_in_bf16() -> None:
    """Chain weights: each greedy token is the permutation's successor of the last one (a
    margin bf16 rounding cannot flip), so bf16 verification stays on the reference."""
    cfg = OracleBenchConfig(device="cpu", dtype="bfloat16", tiny=True, batches=(4,),
                            acceptances=(1.0,), ks=(3,), prompt_tokens=32, max_tokens=24,
                            repeats=1, seed=3)
    plain, spec = build_engines(cfg)
    prompts = make_prompts(cfg, 4)
    reference = references(cfg, plain, spec, prompts)
    perm = torch.randperm(cfg.model_config.vocab_size,
                          generator=torch.Generator().manual_seed(cfg.seed + 2))
    succ = torch.empty_like(perm)
    succ[perm] = torch.arange(len(perm))
    for prompt, ref in zip(prompts, reference):
        chain = [prompt[-1]] + ref
        assert ref == [int(succ[t]) for t in chain[:-1]]
    row = measure(cfg, plain, spec, prompts, reference, 3, 1.0)
    assert row["diverged_requests"] == [0] and row["spec_outputs_identical"] == [4]
    assert row["acceptance_rate"] == 1.0 and row["accepted_tokens"] == row["draft_tokens"] > 0
