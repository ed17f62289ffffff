"""Speculative decoding in the engine core (n-gram drafts): greedy outputs are exactly plain
greedy's on every prompt, alone and batched, under preemption and chunked prefill, with
penalties and logprobs; drafts are actually made and accepted (stats), every block comes back,
and seeded sampling stays valid. The distribution itself is tested in test_spec_verify.py."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("spec") / "llama", "llama", seed=8,
                                  extra_config={"num_hidden_layers": 2}))


def _engine(model: str, spec: bool, num_blocks: int = 256, budget: int = 512,
            k: int = 4) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=model, device="cpu", attention_backend="torch",
        cache=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget),
        speculative=SpeculativeConfig(method="ngram" if spec else None,
                                      num_speculative_tokens=k, max_batch_size=16,
                                      adaptive=False)))  # draft every step: deterministic


def _prompts(n: int) -> list[list[int]]:
    """Prompts that repeat themselves, so n-gram drafts often match what greedy continues."""
    out = []
    for j in range(n):
        motif = [3 + (11 * j + 5 * i) % 200 for i in range(6 + j % 5)]
        out.append((motif * 6)[: 20 + 3 * j])
    return out


class OracleProposer:
    """Drafts the plain-greedy continuation (known from a reference run) with every third
    draft wrong: both acceptance and rejection happen at known places, whatever the model."""

    def __init__(self, prompts, outputs, k: int = 4, corrupt: bool = True) -> None:
        self.refs = [(list(p), list(o)) for p, o in zip(prompts, outputs)]
        self.k = k
        self.corrupt = corrupt
        self.calls = 0

    def propose(self, token_ids, max_tokens=None):
        for prompt, output in self.refs:
            done = len(token_ids) - len(prompt)
            if token_ids[:len(prompt)] == prompt and output[:done] == token_ids[len(prompt):]:
                self.calls += 1
                drafts = output[done:done + min(self.k, max_tokens or self.k)]
                if not self.corrupt:
                    return drafts
                return [t if (i + self.calls) % 3 else (t + 1) % 500 for i, t in enumerate(drafts)]
        return []


def _run(engine: LLMEngine, prompts, params):
    outs = engine.generate(prompts, params)
    assert engine.kv_manager.is_idle() or engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
    return [(o.token_ids, o.finish_reason) for o in outs]


@pytest.mark.parametrize("batch", [1, 16])
def test_greedy_is_exactly_plain_greedy(model, batch):
    """Drafts that are right, partly right and wrong: the output never changes."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = _prompts(batch)
    want = _run(_engine(model, False), prompts, params)
    spec = _engine(model, True)
    spec.spec.proposer = OracleProposer(prompts, [w[0] for w in want])
    assert _run(spec, prompts, params) == want
    stats = spec.spec.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    print(f"batch {batch}: drafted {stats.num_draft_tokens}, accepted "
          f"{stats.num_accepted_tokens} ({stats.acceptance_rate:.0%})")


def _steps(engine: LLMEngine, prompt, params) -> int:
    engine.add_request(prompt, params)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return steps


def test_accepted_drafts_save_steps(model):
    """All-correct drafts of k = 4: about a fifth of plain decoding's steps. This fails if kept
    drafts' KV were not counted as computed (it would be recomputed in extra steps)."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompt = _prompts(1)[0]
    plain = _engine(model, False)
    want = plain.generate([prompt], params)[0].token_ids
    spec = _engine(model, True)
    spec.spec.proposer = OracleProposer([prompt], [want], corrupt=False)
    steps, plain_steps = _steps(spec, prompt, params), _steps(plain, prompt, params)
    ideal = 1 + -(-(params.max_tokens - 1) // 5)  # the prefill's token, then 5 per step
    assert steps == ideal, (
        f"{steps} speculative steps (ideal {ideal}) vs {plain_steps} plain")
    assert spec.spec.stats.acceptance_rate == 1.0


def test_rejected_drafts_return_their_blocks(model):
    """After every step, a running request holds no block past its sequence: the slots of
    rejected drafts went back to the pool (block size 4, drafts of 6 span blocks)."""
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    prompts = _prompts(3)
    want = [o.token_ids for o in _engine(model, False).generate(prompts, params)]
    spec = _engine(model, True, k=6)
    spec.spec.proposer = OracleProposer(prompts, want, k=6)
    for prompt in prompts:
        spec.add_request(prompt, params)
    while spec.has_unfinished():
        spec.step()
        for r in spec.scheduler.running:
            held = len(spec.kv_manager.block_table(r.request_id))
            assert held <= -(-r.num_tokens // 4), f"{held} blocks for {r.num_tokens} tokens"
    assert spec.spec.stats.num_accepted_tokens < spec.spec.stats.num_draft_tokens


def test_ngram_drafts_keep_greedy(model):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = _prompts(4)
    spec = _engine(model, True)
    assert _run(spec, prompts, params) == _run(_engine(model, False), prompts, params)
    assert spec.spec.stats.num_draft_tokens > 0


def test_greedy_under_preemption_and_chunked_prefill(model):
    """18 blocks of 4 for 8 requests: preemptions drop drafts and recompute; a 16-token budget
    chunks the prompts and trims drafts to what fits."""
    params = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.2,
                             logprobs=True, ignore_eos=True)] * 4
    prompts = _prompts(8)
    want = _run(_engine(model, False, num_blocks=18, budget=16), prompts, params)
    spec = _engine(model, True, num_blocks=18, budget=16)
    spec.spec.proposer = OracleProposer(prompts, [w[0] for w in want])
    assert _run(spec, prompts, params) == want
    assert spec.scheduler.num_preemptions > 0
    assert spec.spec.stats.num_accepted_tokens > 0


def test_stops_inside_accepted_drafts_and_max_tokens(model):
    """A stop token or max_tokens reached inside a run of accepted drafts ends the request
    there, as plain decoding does."""
    plain = _engine(model, False)
    prompts = _prompts(4)
    full = plain.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0,
                                                  ignore_eos=True))
    spec = _engine(model, True)
    spec.spec.proposer = OracleProposer(prompts, [o.token_ids for o in full], k=6)
    for prompt, out in zip(prompts, full):
        stop = out.token_ids[9]
        params = SamplingParams(max_tokens=13, temperature=0.0, ignore_eos=True,
                                stop_token_ids=(stop,))
        assert _run(spec, [prompt], params) == _run(plain, [prompt], params)


@pytest.mark.parametrize("batch", [1, 16])
def test_seeded_sampling_is_exactly_plain_sampling(model, batch):
    """n-gram-style (point-mass) drafts are verified against the plain sampler's own draw at
    each position, so seeded sampled output is plain decoding's token for token: here with
    drafts that are mostly the plain run's own tokens (accepted) and partly wrong."""
    params = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=11 + i,
                             ignore_eos=True, logprobs=i % 2 == 0) for i in range(batch)]
    prompts = _prompts(batch)
    plain = _engine(model, False).generate(prompts, params)
    spec = _engine(model, True)
    spec.spec.proposer = OracleProposer(prompts, [o.token_ids for o in plain])
    got = spec.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    for g, p in zip(got, plain):
        assert g.logprobs == pytest.approx(p.logprobs, rel=1e-5)
    stats = spec.spec.stats
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens
    assert spec.kv_manager.num_free_blocks == spec.kv_manager.num_blocks


def test_config_refusals():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match="256"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=7, max_batch_size=64)


def test_spec_counters_on_metrics(model):
    from prometheus_client import CollectorRegistry

    from engine.metrics import EngineMetrics
    from pdserve.metrics import MetricFactory

    registry = CollectorRegistry()
    metrics = EngineMetrics(MetricFactory("tiny", registry))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = _prompts(3)
    want = [o.token_ids for o in _engine(model, False).generate(prompts, params)]
    spec = _engine(model, True)
    spec.spec.proposer = OracleProposer(prompts, want)
    spec.generate(prompts, params)
    metrics.publish(spec)
    metrics.publish(spec)  # nothing new: no double counting
    stats = spec.spec.stats

    def value(name: str) -> float:
        return registry.get_sample_value(f"pdserve:spec_decode_{name}_total",
                                         {"model_name": "tiny"})
    assert value("num_drafts") == stats.num_verified_requests > 0
    assert value("num_draft_tokens") == stats.num_draft_tokens > 0
    assert value("num_accepted_tokens") == stats.num_accepted_tokens > 0


def test_payoff_drafts_where_it_measured_faster():
    """Drafting is tried first, then plain decoding; afterwards the faster mode wins at each
    batch-size bucket, and the other is re-probed, ever more rarely while it keeps losing."""
    from engine.spec.decoding import Payoff

    payoff = Payoff(probe_every=4, max_probe_every=16)
    assert payoff.wants_drafts(8)  # nothing measured: draft
    payoff.record(8, True, 30, 1.0)
    assert not payoff.wants_drafts(8)  # now measure plain decoding
    payoff.record(8, False, 20, 1.0)
    choices = [payoff.wants_drafts(8) for _ in range(72)]
    assert choices[:8].count(False) == 1  # drafting won; its loser probed after 4 steps
    probes = [i for i, c in enumerate(choices) if not c]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps[:2] == [8, 16] and set(gaps[2:]) == {16}  # backing off to max_probe_every
    payoff.record(8, True, 5, 1.0)
    payoff.record(8, True, 5, 1.0)
    payoff.record(8, True, 5, 1.0)  # drafting got slow (moving average now below 20)
    assert payoff.rates(8)[True] < 20
    choices = [payoff.wants_drafts(8) for _ in range(32)]
    probes = [i for i, c in enumerate(choices) if c]  # now drafting is the probed loser
    assert probes and [b - a for a, b in zip(probes, probes[1:])][:2] == [4, 8]  # restarted
    assert payoff.wants_drafts(64)  # another bucket starts over
    with pytest.raises(ValueError, match="probe_every"):
        Payoff(probe_every=0)


def test_requests_can_opt_out_of_drafting(model):
    """`SamplingParams.speculative=False`: the pool drafts for the other requests only, and
    every output is still plain greedy's."""
    prompts = _prompts(4)
    on = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    off = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, speculative=False)
    want = _run(_engine(model, False), prompts, on)
    only_off = _engine(model, True)
    assert _run(only_off, prompts, off) == want
    assert only_off.spec.stats.num_draft_tokens == 0  # nobody drafted
    mixed = _engine(model, True)
    assert _run(mixed, prompts, [off, on, off, on]) == want  # prompt 1 drafts
    assert mixed.spec.stats.num_draft_tokens > 0
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="no")


def test_opt_out_crosses_the_wire():
    """gRPC and the OpenAI API carry the flag to the workers' SamplingParams."""
    from protos.convert import sampling_from_proto, sampling_to_proto
    from protos.pdserve.v1 import generation_pb2
    from router.openai_protocol import CompletionRequest

    assert sampling_from_proto(generation_pb2.SamplingParams()).speculative is True
    proto = generation_pb2.SamplingParams(speculative=False)
    assert sampling_from_proto(proto).speculative is False
    assert sampling_to_proto(SamplingParams(speculative=False)).speculative is False
    request = CompletionRequest(model="m", prompt="x", speculative=False)
    assert sampling_from_proto(request.sampling(8, False)).speculative is False


def test_payoff_times_do_not_overlap_under_async_scheduling(model):
    """Payoff compares throughput: the seconds it records per step are disjoint intervals
    (their sum fits in the run's wall time), not each step's launch-to-read-back latency,
    which with asynchronous scheduling spans two overlapped plain steps and made plain
    decoding look up to 2x slower than it is (drafting kept where it lost)."""
    import time

    from engine.spec.decoding import Payoff

    class Recording(Payoff):  # never drafts: every step is a plain, overlapped one
        def __init__(self) -> None:
            super().__init__()
            self.records: list[tuple[bool, float]] = []

        def wants_drafts(self, batch, from_shadow=False):
            return False

        def record(self, batch, speculative, tokens, seconds):
            self.records.append((speculative, seconds))
            super().record(batch, speculative, tokens, seconds)

    engine = LLMEngine(EngineConfig(
        model=model, device="cpu", attention_backend="torch", async_scheduling=True,
        cache=CacheConfig(block_size=4, num_blocks=256),
        speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3,
                                      max_batch_size=16)))
    engine.spec.payoff = payoff = Recording()
    start = time.monotonic()
    engine.generate(_prompts(8), SamplingParams(max_tokens=24, temperature=0.0,
                                                ignore_eos=True))
    wall = time.monotonic() - start
    assert len(payoff.records) >= 20
    assert sum(s for _, s in payoff.records) <= wall
