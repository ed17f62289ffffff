"""How the ranks 1..N-1 of a multi-rank instance are started and stopped.

`rank_main(spec)` (rank.py) is all a rank process runs, whoever starts it:
- `ProcessLauncher`: fresh local interpreters (`python -m engine.executor.rank`, the spec on
  stdin); `pdserve generate` and engine tests use it.
- `cluster.rank_actors.RayRankLauncher`: Ray actors in the instance's placement group, one
  bundle per rank; the serving pools use it.
A launcher only starts, watches and stops processes; a rank that dies is noticed by rank 0 on
its plan socket (plan_channel.py), whoever started it.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Protocol

from engine.executor.rank import RankSpec

log = logging.getLogger(__name__)
_PROJECT_ROOT = str(Path(__file__).resolve().parents[2])  # rank processes import engine from here


class RankLauncher(Protocol):
    def start(self, specs: list[RankSpec]) -> None:
        """Start one process per spec (ranks 1..N-1, in order); returns at once."""
        ...

    @property
    def pids(self) -> list[int]:
        """Process ids of ranks 1..N-1 (tests kill them)."""
        ...

    def dead_ranks(self) -> list[int]:
        """Ranks whose process has exited."""
        ...

    def stop(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the ranks to exit (they were told to), then kill them."""
        ...


class ProcessLauncher:
    """Ranks as local child processes: a fresh interpreter each (no forked CUDA or Gloo state,
    and unlike multiprocessing's spawn it never re-imports the caller's main module)."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen] = []

    def start(self, specs: list[RankSpec]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT_ROOT, env.get("PYTHONPATH")]))
        for spec in specs:
            process = subprocess.Popen([sys.executable, "-m", "engine.executor.rank"],
                                       stdin=subprocess.PIPE, env=env)
            self._processes.append(process)
            process.stdin.write(pickle.dumps(spec))  # the secret never shows in `ps`
            process.stdin.close()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def dead_ranks(self) -> list[int]:
        return [i + 1 for i, p in enumerate(self._processes) if p.poll() is not None]

    def stop(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("rank process %s did not exit; killing it", process.pid)
                process.kill()
                process.wait(5.0)
        self._processes.clear()
