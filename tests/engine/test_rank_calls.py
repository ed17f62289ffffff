"""Rank services over the plan sockets (real rank processes, tiny model, TP=2 on CPU): calls
reach every other rank and answer; errors come back without pickles; inline calls run in order
with the plans; events reach rank 0; a killed rank is named at once and calls fail fast."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.executor.rank_calls import RankCallError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.engine.rank_echo_service import EchoService

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def engine(tmp_path):
    path = save_tiny_hf_model(tmp_path / "llama", "llama", seed=1,
                              extra_config={"num_hidden_layers": 4})
    config = EngineConfig(model=str(path), device="cpu", attention_backend="torch",
                          cache=CacheConfig(block_size=4, num_blocks=32),
                          scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32),
                          parallel=ParallelConfig(1, 3, collective_timeout_s=20))
    engine = LLMEngine(config, rank_service=EchoService)
    yield engine
    engine.shutdown()


def test_calls_events_and_inline_order(engine):
    ranks = engine.rank_caller
    replies = ranks.call("echo", (1, "two"))
    assert sorted(replies) == [1, 2]
    for rank, reply in replies.items():
        assert reply["rank"] == rank and reply["args"] == [1, "two"]
        assert reply["layout"] == "tp=1 pp=3"
        assert reply["kv_shape"][0] in (1, 2)  # its stage's layers (4 over 3 stages)
    with pytest.raises(RankCallError, match=r"rank 1: ValueError: no call 'nope'"):
        ranks.call("nope")

    events = []
    got_both = threading.Event()

    def on_event(rank, name, value):
        events.append((rank, name, value))
        if len(events) == 2:
            got_both.set()
    ranks.set_event_handler(on_event)
    ranks.post("emit", ("hello",))
    assert got_both.wait(10)
    assert sorted(events) == [(r, "note", {"rank": r, "text": "hello"}) for r in (1, 2)]

    # an inline call is handled between the plans sent before and after it
    ranks.post("mark", ("before",), inline=True)
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0))
    ranks.post("mark", ("after",), inline=True)
    for marks in ranks.call("marks").values():
        (_, before), (_, after) = marks
        assert before == 0 and after >= 3  # three tokens: at least three plans in between


def test_a_killed_rank_is_named_at_once_and_calls_fail_fast(engine):
    ranks = engine.rank_caller
    lost = []
    named = threading.Event()
    ranks.add_lost_handler(lambda rank: (lost.append(rank), named.set()))
    killed_at = time.monotonic()
    os.kill(engine.executor.rank_pids[1], signal.SIGKILL)  # rank 2
    assert named.wait(5)
    assert lost == [2] and time.monotonic() - killed_at < 5
    assert engine.executor.dead_ranks() == [2]
    started = time.monotonic()
    with pytest.raises(RankCallError, match=r"rank\(s\) \[2\] of this instance are gone"):
        ranks.call("echo", timeout_s=30)
    assert time.monotonic() - started < 1
