"""Pipeline micro-batches (real rank processes, Gloo on CPU): a PP=2 engine keeps two steps in
flight, of disjoint requests, and still produces exactly the tokens of one rank; with a single
request nothing can overlap and it runs one step at a time."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_no_leaks

pytestmark = pytest.mark.timeout(180)


def _config(model: str, pp: int) -> EngineConfig:
    return EngineConfig(model=model, device="cpu", attention_backend="torch",
                        cache=CacheConfig(block_size=4, num_blocks=128),
                        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                        parallel=ParallelConfig(1, pp, collective_timeout_s=30))


class _Recorder:
    """Wraps an executor's launch: which requests each step samples, and how many steps the
    core had in flight when it launched one."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.launches: list[tuple[frozenset[str], int]] = []
        self._launch = engine.executor.launch
        engine.executor.launch = self.launch

    def launch(self, plan, listener=None):
        sampled = frozenset(rid for rid, row in zip(plan.request_ids, plan.samples) if row)
        self.launches.append((sampled, len(self.engine._flights)))
        return self._launch(plan, listener)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pipeline")
    return str(save_tiny_hf_model(root / "llama", "llama", seed=2,
                                  extra_config={"num_hidden_layers": 4}))


def test_two_micro_batches_in_flight_give_one_ranks_tokens(model):
    prompts = [[3 + (5 * i + j) % 200 for j in range(4 + 3 * i)] for i in range(8)]
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=12, temperature=0.9, top_p=0.8, seed=i, ignore_eos=True)
              for i in range(8)]
    want = [o.token_ids for o in LLMEngine(_config(model, 1)).generate(prompts, params)]
    engine = LLMEngine(_config(model, 2))
    try:
        assert engine.pipeline_depth == 2
        recorder = _Recorder(engine)
        got = [o.token_ids for o in engine.generate(prompts, params)]
        assert got == want
        assert_no_leaks(engine)
        in_flight = [depth for _, depth in recorder.launches]
        assert max(in_flight) == 1  # one step was always in flight when the next launched...
        assert in_flight.count(1) > len(in_flight) // 2  # ...most of the time
        for (a, _), (b, depth) in zip(recorder.launches, recorder.launches[1:]):
            if depth:  # launched while the previous one was in flight: other requests
                assert not a & b
        assert max(len(s) for s, _ in recorder.launches) <= 4  # half of the 8 per step
    finally:
        engine.shutdown()


def test_one_request_runs_one_step_at_a_time(model):
    engine = LLMEngine(_config(model, 2))
    try:
        recorder = _Recorder(engine)
        engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=6, temperature=0.0))
        assert [depth for _, depth in recorder.launches] == [0] * 6
    finally:
        engine.shutdown()
