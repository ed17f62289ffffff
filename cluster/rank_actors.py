"""Ranks 1..N-1 of a serving instance as Ray actors, one per bundle of its placement group.

The instance's worker actor is rank 0, in bundle 0 of the instance's STRICT_PACK group
(cluster/placement.py); `RayRankLauncher` (an engine/executor/launchers.py launcher) puts rank r
on bundle r, asking for exactly that bundle's resources, so Ray gives each GPU rank its own GPU
on the same node. A rank actor runs `rank_main` until rank 0 tells it to stop or goes away; if
it dies, rank 0 sees its plan socket close (plan_channel.py) and fails the instance, whose
supervisor replaces it (placement group and all ranks).
"""

from __future__ import annotations

import logging
import os

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.executor.rank import RankSpec

log = logging.getLogger(__name__)
PID_TIMEOUT_S = 30.0


class RankActor:
    """One rank process (Ray actor): settings first, then `rank_main` in `run`."""

    def __init__(self, env: dict[str, str], num_threads: int) -> None:
        os.environ.update(env)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch

        torch.set_num_threads(max(1, num_threads))

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec: RankSpec) -> None:
        from engine.executor.rank import rank_main

        rank_main(spec)


class RayRankLauncher:
    """Starts ranks 1..N-1 as actors in the caller's placement group (bundle r for rank r)."""

    def __init__(self, name: str, bundles: tuple[dict[str, float], ...], env: dict[str, str],
                 num_threads: int = 1) -> None:
        self._name = name
        self._bundles = bundles  # bundle r is rank r's reservation; () without a placement
        self._env = env
        self._num_threads = num_threads
        self._actors: list = []
        self._runs: list = []

    def start(self, specs: list[RankSpec]) -> None:
        group = ray.util.get_current_placement_group()
        for spec in specs:
            options = self._options(spec.rank, group)
            actor = ray.remote(RankActor).options(**options).remote(self._env, self._num_threads)
            self._actors.append(actor)
            self._runs.append(actor.run.remote(spec))

    def _options(self, rank: int, group) -> dict:
        if group is not None and rank < len(self._bundles):
            resources = self._bundles[rank]
            strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
        else:  # no placement (tests): a small share of a core, anywhere
            resources, strategy = {"CPU": 0.1}, "DEFAULT"
        return {"num_cpus": resources.get("CPU", 0.0), "num_gpus": resources.get("GPU", 0.0),
                "name": f"{self._name}-rank{rank}", "max_concurrency": 2,
                "scheduling_strategy": strategy, "runtime_env": {"env_vars": dict(self._env)}}

    @property
    def pids(self) -> list[int]:
        return ray.get([actor.pid.remote() for actor in self._actors], timeout=PID_TIMEOUT_S)

    def dead_ranks(self) -> list[int]:
        if not self._runs:
            return []
        done, _ = ray.wait(list(self._runs), num_returns=len(self._runs), timeout=0)
        finished = set(done)
        return [index + 1 for index, ref in enumerate(self._runs) if ref in finished]

    def stop(self, timeout_s: float) -> None:
        if self._runs:
            ray.wait(list(self._runs), num_returns=len(self._runs), timeout=timeout_s)
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                log.debug("rank actor already gone", exc_info=True)
        self._actors.clear()
        self._runs.clear()
