"""Instance lifecycle as the router sees it, and the supervisor that owns it.

Every instance slot (e.g. "decode-1") is in exactly one state, changed only here:

    STARTING --(backend started / replacement joined)--> READY --(drain)--> DRAINING --> removed
        ^                                                  |                   |
        |                                                  v                   v
        `----(replacement: new actor, new placement group)-- DEAD <-------------'
    DEAD: its process died (the actor call or its output stream failed), its engine thread
    crashed (health reports an error), or it is wedged (a health call exceeds its deadline, or
    one engine step has run longer than the watchdog). The dead actor is killed at once, so a
    wedged process cannot come back half-alive with stale state; its slot is then refilled by a
    new incarnation (`supervision.replace_dead`): a new actor in a new placement group, which
    loads the model, pairs with every live peer under a new channel generation, and only then
    turns READY. A slot that keeps dying backs off: the n-th consecutive restart waits
    restart_backoff_s * 2**(n-2), at most restart_backoff_max_s (the first is immediate); a slot
    READY for stable_after_s starts counting again.

The backend routes only to READY instances. When an instance dies, the supervisor calls the
backend's `on_dead` once per incarnation, which moves (or ends) that instance's requests.
Replacements join one at a time, so two slots restarting together always end up paired.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import ray

from cluster.config import SupervisionConfig
from cluster.pools import Worker, await_ref, kill_actor
from protos.pdserve.v1 import generation_pb2

log = logging.getLogger(__name__)


class InstanceStatus(enum.Enum):
    STARTING = generation_pb2.INSTANCE_STATUS_STARTING
    READY = generation_pb2.INSTANCE_STATUS_READY
    DRAINING = generation_pb2.INSTANCE_STATUS_DRAINING
    DEAD = generation_pb2.INSTANCE_STATUS_DEAD


_WATCHED = (InstanceStatus.READY, InstanceStatus.DRAINING)  # polled for health


@dataclass(slots=True)
class Instance:
    """One instance slot's lifecycle record; `worker` is its current incarnation."""

    worker: Worker
    status: InstanceStatus = InstanceStatus.STARTING
    reason: str = ""  # why it is not READY, in a few words a client may see
    since_s: float = 0.0  # monotonic time of the last transition
    incarnation: int = 0  # how many times the slot was refilled
    failures: int = 0  # consecutive deaths (and failed restarts) without a stable run
    restart_failures: int = 0  # replacements that failed to start or join, in all
    starts: int = 0  # replacements tried (successful or not): the "-r<n>" of their names

    @property
    def instance_id(self) -> str:
        return self.worker.spec.instance_id

    @property
    def role(self) -> str:
        return self.worker.spec.role


DeadCallback = Callable[[Worker, str], None]


class Recovery(Protocol):
    """What the supervisor needs to refill a slot (the backend implements it)."""

    async def start(self, old: Worker, incarnation: int) -> Worker:
        """A new actor for `old`'s slot, in a new placement group, its model loaded."""

    async def join(self, new: Worker, old: Worker) -> None:
        """Pair `new` with every live peer and put it in `old`'s place in its pool."""

    def release(self, worker: Worker) -> None:
        """Kill an actor and free its placement group."""


class Supervisor:
    """Owns every instance's `InstanceStatus`; polls health, declares deaths, refills slots."""

    def __init__(self, workers: Iterable[Worker], on_dead: DeadCallback,
                 config: SupervisionConfig | None = None,
                 recovery: Recovery | None = None) -> None:
        self.config = config or SupervisionConfig()
        self._on_dead = on_dead
        self._recovery = recovery if self.config.replace_dead else None
        now = time.monotonic()
        self._instances = {w.spec.instance_id: Instance(w, since_s=now) for w in workers}
        self._task: asyncio.Task | None = None
        self._restarts: set[asyncio.Task] = set()
        self._join_lock = asyncio.Lock()
        self._stopping = False

    # ---- state ----------------------------------------------------------------------------
    def instance(self, instance_id: str) -> Instance:
        return self._instances[instance_id]

    def is_ready(self, worker: Worker) -> bool:
        inst = self._instances.get(worker.spec.instance_id)
        return inst is not None and inst.worker is worker and inst.status is InstanceStatus.READY

    def is_live(self, worker: Worker) -> bool:
        """READY or DRAINING: still serving the requests it has."""
        inst = self._instances.get(worker.spec.instance_id)
        return inst is not None and inst.worker is worker and inst.status in _WATCHED

    def ready(self, workers: Iterable[Worker]) -> list[Worker]:
        return [w for w in workers if self.is_ready(w)]

    def mark_ready(self, worker: Worker) -> None:
        inst = self._instances[worker.spec.instance_id]
        if inst.worker is worker and inst.status is not InstanceStatus.DEAD:
            self._set(inst, InstanceStatus.READY, "")

    def mark_draining(self, worker: Worker, reason: str) -> None:
        inst = self._instances[worker.spec.instance_id]
        if inst.worker is worker and inst.status is InstanceStatus.READY:
            self._set(inst, InstanceStatus.DRAINING, reason)

    def remove(self, worker: Worker) -> None:
        """Forget a drained instance's slot (it is not replaced)."""
        inst = self._instances.get(worker.spec.instance_id)
        if inst is not None and inst.worker is worker:
            del self._instances[worker.spec.instance_id]

    def mark_dead(self, worker: Worker, reason: str) -> None:
        """Idempotent per incarnation: the first caller's reason wins, a report about an older
        incarnation is ignored; `on_dead` runs once, the actor is killed, and the slot is
        refilled (if configured)."""
        inst = self._instances.get(worker.spec.instance_id)
        if inst is None or inst.worker is not worker or inst.status not in _WATCHED:
            return  # unknown, an older incarnation, or already dead (maybe being replaced)
        stable = (inst.status is InstanceStatus.READY
                  and time.monotonic() - inst.since_s >= self.config.stable_after_s)
        inst.failures = 0 if stable or inst.incarnation == 0 else inst.failures + 1
        self._set(inst, InstanceStatus.DEAD, reason)
        log.error("instance %s (incarnation %d) is dead: %s", inst.instance_id,
                  inst.incarnation, reason)
        try:
            self._on_dead(worker, reason)
        finally:
            kill_actor(worker)
            if self._recovery is not None and not self._stopping:
                task = asyncio.get_running_loop().create_task(self._refill(inst, reason))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)

    def _set(self, inst: Instance, status: InstanceStatus, reason: str) -> None:
        inst.status, inst.reason, inst.since_s = status, reason, time.monotonic()

    # ---- replacement ----------------------------------------------------------------------
    def backoff_s(self, failures: int) -> float:
        """Wait before a slot's restart after `failures` consecutive failures."""
        if failures <= 0:
            return 0.0
        return min(self.config.restart_backoff_max_s,
                   self.config.restart_backoff_s * 2 ** (failures - 1))

    async def _refill(self, inst: Instance, reason: str) -> None:
        """Start new incarnations of a dead slot until one joins (or the supervisor stops)."""
        while not self._stopping:
            delay = self.backoff_s(inst.failures)
            if delay:
                inst.reason = f"{reason}; restart {inst.failures + 1} in {delay:g} s"
                log.warning("%s: restart %d in %g s", inst.instance_id, inst.failures + 1, delay)
                await asyncio.sleep(delay)
            old = inst.worker
            self._set(inst, InstanceStatus.STARTING, f"replacing ({reason})")
            inst.starts += 1  # names each try anew: a failed one's actor name may linger
            try:
                new = await self._recovery.start(old, inst.starts)
            except Exception as exc:  # noqa: BLE001 - logged, counted, retried with backoff
                self._restart_failed(inst, "start", exc)
                continue
            if await self._join(inst, new, old):
                return

    async def _join(self, inst: Instance, new: Worker, old: Worker) -> bool:
        async with self._join_lock:
            try:
                await self._recovery.join(new, old)
            except BaseException as exc:
                self._recovery.release(new)
                if not isinstance(exc, Exception):
                    raise
                self._restart_failed(inst, "join", exc)
                return False
            inst.worker, inst.incarnation = new, inst.incarnation + 1
            self._set(inst, InstanceStatus.READY, "")
        log.info("instance %s is back (incarnation %d)", inst.instance_id, inst.incarnation)
        return True

    def _restart_failed(self, inst: Instance, stage: str, exc: Exception) -> None:
        inst.failures += 1
        inst.restart_failures += 1
        log.error("restart of %s failed at %s: %r", inst.instance_id, stage, exc)
        self._set(inst, InstanceStatus.DEAD, f"restart failed ({stage})")

    # ---- watching -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        self._stopping = True
        tasks = [t for t in (self._task, *self._restarts) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _watch(self) -> None:
        while True:
            live = [i for i in self._instances.values() if i.status in _WATCHED]
            await asyncio.gather(*(self._check(i.worker) for i in live))
            await asyncio.sleep(self.config.poll_interval_s)

    async def _check(self, worker: Worker) -> None:
        reason = await self.probe(worker)
        if reason:
            self.mark_dead(worker, reason)

    async def probe(self, worker: Worker) -> str:
        """"" when healthy, else why the instance is dead (short, client-safe)."""
        try:
            health = await asyncio.wait_for(await_ref(worker.actor.health.remote()),
                                            self.config.health_timeout_s)
        except asyncio.TimeoutError:
            return f"unresponsive: no health answer within {self.config.health_timeout_s:g} s"
        except ray.exceptions.RayActorError:
            return "process died"
        except Exception as exc:  # noqa: BLE001 - any other failure of the call is a death too
            log.warning("health call to %s failed: %r", worker.spec.instance_id, exc)
            return "health call failed"
        if health.error:
            log.error("engine of %s failed: %s", worker.spec.instance_id, health.error)
            return "engine failed"
        if not health.alive:
            return "engine stopped"
        if health.step_running_s > self.config.step_timeout_s:
            return (f"wedged: one engine step has run {health.step_running_s:.0f} s "
                    f"(watchdog {self.config.step_timeout_s:g} s)")
        return ""

    # ---- reporting ------------------------------------------------------------------------
    def annotate(self, state: generation_pb2.InstanceState) -> generation_pb2.InstanceState:
        inst = self._instances.get(state.instance_id)
        if inst is not None:
            state.status, state.status_reason = inst.status.value, inst.reason
        return state

    @property
    def instances(self) -> list[Instance]:
        return list(self._instances.values())
