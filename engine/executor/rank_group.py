"""The executor of an instance that spans ranks (tensor x pipeline parallel).

Rank 0 lives in this process, beside the engine core; ranks 1..N-1 are processes of their own
(`engine/executor/rank.py: rank_main`, started by a launcher: local processes for `pdserve
generate` and tests). Each step the plan goes to every other rank first (plan_channel.py), then
rank 0 runs it too; all ranks run the same plan, so all meet in the same collectives in the same
order, and no rank decides anything alone. Rank 0 always ends up with the sampled ids: with
tensor parallelism every rank samples the same ids from the gathered logits, with pipeline
parallelism the last stage broadcasts them (ModelRunner._share_sampled).

Faults: a rank that dies or hangs makes rank 0's next collective fail (a lost connection at
once, a hang at `collective_timeout_s`); the step raises and the engine loop that drove it fails
the instance. If rank 0's process dies, every other rank sees the plan socket close and exits.
"""

from __future__ import annotations

import logging
import os
import pickle
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config import EngineConfig
from engine.executor.base import LayerListener
from engine.executor.local import LocalStepHandle
from engine.executor.plan_channel import PlanSender
from engine.executor.rank import Rank, RankSpec, build_rank, connect_store
from engine.inflight import Readback
from engine.plan import StepPlan

log = logging.getLogger(__name__)
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])  # rank processes import engine from here
JOIN_TIMEOUT_S = 10.0  # a stopped rank process must exit within this, else it is killed


@dataclass(slots=True)
class PlanStats:
    """What sending plans cost (benchmarks, RESULTS.md)."""

    num_plans: int = 0
    num_bytes: int = 0
    send_s: float = 0.0


class RankGroupExecutor:
    """N ranks in N processes, this one being rank 0."""

    def __init__(self, config: EngineConfig, max_model_len: int, host: str = "127.0.0.1") -> None:
        par = config.parallel
        self.world_size = par.world_size
        timeout_s = par.collective_timeout_s
        self._authkey = secrets.token_bytes(32)  # only this instance's ranks may connect
        self._sender = PlanSender(host, self._authkey)
        store = connect_store(host, 0, True, self.world_size, timeout_s)
        self._processes: list[subprocess.Popen] = []
        self.plan_stats = PlanStats()
        try:
            self._start_ranks(config, store, host, max_model_len)
            self._sender.accept(self.world_size - 1, timeout_s)
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

    def _start_ranks(self, config: EngineConfig, store, host: str, max_model_len: int) -> None:
        """A fresh interpreter per rank (no forked CUDA or Gloo state, and unlike
        multiprocessing's spawn it never re-imports the caller's main module)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_ROOT, env.get("PYTHONPATH")]))
        for rank in range(1, self.world_size):
            spec = RankSpec(config, rank, host, store.port, self._sender.address,
                            self._authkey, max_model_len)
            process = subprocess.Popen([sys.executable, "-m", "engine.executor.rank"],
                                       stdin=subprocess.PIPE, env=env)
            self._processes.append(process)
            process.stdin.write(pickle.dumps(spec))
            process.stdin.close()

    def launch(self, plan: StepPlan, layer_listener: LayerListener | None = None
               ) -> LocalStepHandle:
        if layer_listener is not None:
            raise ValueError("streaming KV layer by layer from a multi-rank instance is not "
                             "supported yet (prefill pools run one rank per instance)")
        started = time.perf_counter()
        self.plan_stats.num_bytes += self._sender.send(plan)
        self.plan_stats.send_s += time.perf_counter() - started
        self.plan_stats.num_plans += 1
        sampled = self.runner.execute(plan)
        ids, logprobs, ready = self._readback.start(sampled)
        return LocalStepHandle(plan.step_id, plan.num_sampled, ids, logprobs, ready)

    @property
    def rank_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1 (tests kill them)."""
        return [p.pid for p in self._processes]

    def dead_ranks(self) -> list[int]:
        """Ranks (1..N-1) whose process has exited."""
        return [i + 1 for i, p in enumerate(self._processes) if p.poll() is not None]

    def shutdown(self) -> None:
        """Stop every rank process: ask, wait, then kill what is left."""
        self._sender.close()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("rank process %s did not exit; killing it", process.pid)
                process.kill()
                process.wait(5.0)
        self._processes.clear()
