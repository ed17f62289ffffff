"""The executor of an instance that spans ranks (tensor x pipeline parallel).

Rank 0 lives in this process, beside the engine core; ranks 1..N-1 are processes of their own
(`engine/executor/rank.py: rank_main`, started by a launcher (launchers.py): local processes for
`pdserve generate` and tests, Ray actors in the instance's placement group for the serving
pools). Each step the plan goes to every other rank first (plan_channel.py), then
rank 0 runs it too; all ranks run the same plan, so all meet in the same collectives in the same
order, and no rank decides anything alone. Rank 0 always ends up with the sampled ids: with
tensor parallelism every rank samples the same ids (engine/tp_sampler.py); with pipeline
parallelism the last stage sends them to rank 0, whose `launch` returns as soon as its own
stage has run and posted the receive (ModelRunner._share_sampled): the engine core keeps up to
`pipeline_depth` micro-batches in flight (engine/core.py), so stage 0 computes step N+1 while
the later stages still run N.

Rank services (rank_calls.py): features with per-rank state (the KV-transfer links of a
disaggregated instance) are called on every rank through `self.ranks` (a RankCaller); a
listener for the layers of the plan about to run is the service's, on each rank.

Faults: a rank that dies closes its plan socket: `self.ranks` sees it at once and calls the
lost-rank handlers (the worker fails the instance), and rank 0's next collective fails too (a
lost connection at once, a hang at `collective_timeout_s`). If rank 0's process dies, every
other rank sees the plan socket close and exits.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.executor.base import LayerListener
from engine.executor.launchers import ProcessLauncher, RankLauncher
from engine.executor.local import LocalStepHandle
from engine.model_runner import PendingSample
from engine.parallel import ParallelContext
from engine.executor.plan_channel import PlanSender
from engine.executor.rank import Rank, RankSpec, build_rank, connect_store
from engine.executor.rank_caller import RankCaller
from engine.executor.rank_calls import ServiceFactory, layout_name
from engine.inflight import Readback
from engine.plan import StepPlan, StepResult

log = logging.getLogger(__name__)
JOIN_TIMEOUT_S = 10.0  # a stopped rank process must exit within this, else it is killed


@dataclass(slots=True)
class PlanStats:
    """What sending plans cost (benchmarks, RESULTS.md)."""

    num_plans: int = 0
    num_bytes: int = 0
    send_s: float = 0.0


@dataclass(slots=True)
class PipelineStepHandle:
    """Rank 0 of a pipeline: a launched step whose ids come from the last stage."""

    step_id: int
    num_sampled: int
    pending: PendingSample | None
    parallel: ParallelContext

    def wait(self) -> StepResult:
        if self.pending is None:
            return StepResult(self.step_id, [])
        self.parallel.wait_result(self.pending.works)  # bounded by the collective timeout
        out, n = self.pending.out, self.num_sampled
        logprobs = out.logprobs[:n].tolist() if out.logprobs is not None else None
        return StepResult(self.step_id, out.token_ids[:n].tolist(), logprobs)


class RankGroupExecutor:
    """N ranks in N processes, this one being rank 0."""

    def __init__(self, config: EngineConfig, max_model_len: int, host: str = "127.0.0.1",
                 launcher: RankLauncher | None = None,
                 service: ServiceFactory | None = None) -> None:
        par = config.parallel
        self.world_size = par.world_size
        self.pipeline_depth = par.pipeline_parallel_size  # micro-batches the core keeps in flight
        self.layout = layout_name(par.tensor_parallel_size, par.pipeline_parallel_size)
        timeout_s = par.collective_timeout_s
        self._authkey = secrets.token_bytes(32)  # only this instance's ranks may connect
        self._sender = PlanSender(host, self._authkey)
        store = connect_store(host, 0, True, self.world_size, timeout_s)
        self._launcher = launcher or ProcessLauncher()
        self.plan_stats = PlanStats()
        try:
            self._launcher.start([RankSpec(config, rank, host, store.port, self._sender.address,
                                           self._authkey, max_model_len, service)
                                  for rank in range(1, self.world_size)])
            self._sender.accept(self.world_size - 1, timeout_s)
            self.ranks = RankCaller(self._sender, self.world_size)
            self.rank: Rank = build_rank(config, store, 0, max_model_len)
        except BaseException:
            self.shutdown()
            raise
        self._store = store  # the other ranks' groups rendezvous through it: keep it alive
        self.runner = self.rank.runner
        self.kv_cache = self.rank.kv_cache
        self.num_blocks = self.kv_cache.shape[1]
        self.device = self.runner.device
        self.model_config = self.rank.loaded.config
        self.tokenizer = self.rank.loaded.tokenizer
        self._readback = Readback(self.runner.sampled_ids.shape[0], self.device)

    def launch(self, plan: StepPlan, layer_listener: LayerListener | None = None
               ) -> LocalStepHandle | PipelineStepHandle:
        """Send the plan to every other rank, then run it here. `layer_listener` is rank 0's;
        the other ranks use their service's (set up by an inline call before this plan)."""
        started = time.perf_counter()
        self.plan_stats.num_bytes += self._sender.send(plan)
        self.plan_stats.send_s += time.perf_counter() - started
        self.plan_stats.num_plans += 1
        sampled = self.runner.execute(plan, layer_listener)
        if self.pipeline_depth > 1:
            return PipelineStepHandle(plan.step_id, plan.num_sampled, sampled,
                                      self.rank.parallel)
        ids, logprobs, ready = self._readback.start(sampled)
        return LocalStepHandle(plan.step_id, plan.num_sampled, ids, logprobs, ready)

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1 (tests kill them)."""
        return self._launcher.pids

    def dead_ranks(self) -> list[int]:
        """Ranks (1..N-1) whose process has exited or whose plan socket closed."""
        lost = self.ranks.lost if hasattr(self, "ranks") else set()
        return sorted(set(self._launcher.dead_ranks()) | lost)

    def shutdown(self) -> None:
        """Stop every rank: ask, wait, then kill what is left."""
        self._sender.close()
        self._launcher.stop(JOIN_TIMEOUT_S)
