"""Instance lifecycle as the router sees it, and the supervisor that owns it.

Every instance (one Ray actor of a pool) is in exactly one state, changed only here:

    STARTING --(backend started)--> READY --(drain, issue 12)--> DRAINING
        \\                             |                            |
         `-----------------------------+----------------------------+--> DEAD
    DEAD: its process died (the actor call or its output stream failed), its engine thread
    crashed (health reports an error), or it is wedged (a health call exceeds its deadline, or
    one engine step has run longer than the watchdog). DEAD is final until replacement exists:
    the actor is killed, so a wedged process cannot come back half-alive with stale state.

The backend routes only to READY instances. When an instance dies, the supervisor calls the
backend's `on_dead` once, which ends that instance's requests with UNAVAILABLE at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import ray
from prometheus_client.core import GaugeMetricFamily

from cluster.config import SupervisionConfig
from cluster.pools import Worker
from protos.pdserve.v1 import generation_pb2

log = logging.getLogger(__name__)


class InstanceStatus(enum.Enum):
    STARTING = generation_pb2.INSTANCE_STATUS_STARTING
    READY = generation_pb2.INSTANCE_STATUS_READY
    DRAINING = generation_pb2.INSTANCE_STATUS_DRAINING
    DEAD = generation_pb2.INSTANCE_STATUS_DEAD


@dataclass(slots=True)
class Instance:
    """One instance's lifecycle record."""

    worker: Worker
    status: InstanceStatus = InstanceStatus.STARTING
    reason: str = ""  # why it is not READY, in a few words a client may see
    since_s: float = 0.0  # monotonic time of the last transition

    @property
    def instance_id(self) -> str:
        return self.worker.spec.instance_id

    @property
    def role(self) -> str:
        return self.worker.spec.role


DeadCallback = Callable[[Worker, str], None]


class Supervisor:
    """Owns every instance's `InstanceStatus`; polls health and declares deaths."""

    def __init__(self, workers: Iterable[Worker], on_dead: DeadCallback,
                 config: SupervisionConfig | None = None) -> None:
        self.config = config or SupervisionConfig()
        self._on_dead = on_dead
        now = time.monotonic()
        self._instances = {w.spec.instance_id: Instance(w, since_s=now) for w in workers}
        self._task: asyncio.Task | None = None

    # ---- state ----------------------------------------------------------------------------
    def instance(self, instance_id: str) -> Instance:
        return self._instances[instance_id]

    def is_ready(self, worker: Worker) -> bool:
        return self._instances[worker.spec.instance_id].status is InstanceStatus.READY

    def ready(self, workers: Iterable[Worker]) -> list[Worker]:
        return [w for w in workers if self.is_ready(w)]

    def mark_ready(self, worker: Worker) -> None:
        self._transition(self._instances[worker.spec.instance_id], InstanceStatus.READY, "")

    def mark_dead(self, worker: Worker, reason: str) -> None:
        """Idempotent: the first caller's reason wins; `on_dead` runs once, then the actor is
        killed (best effort)."""
        inst = self._instances[worker.spec.instance_id]
        if inst.status is InstanceStatus.DEAD:
            return
        self._transition(inst, InstanceStatus.DEAD, reason)
        log.error("instance %s is dead: %s", inst.instance_id, reason)
        try:
            self._on_dead(worker, reason)
        finally:
            _kill(worker)

    def _transition(self, inst: Instance, status: InstanceStatus, reason: str) -> None:
        if inst.status is InstanceStatus.DEAD:
            return  # final
        inst.status, inst.reason, inst.since_s = status, reason, time.monotonic()

    # ---- watching -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        while True:
            live = [i for i in self._instances.values() if i.status is not InstanceStatus.DEAD]
            await asyncio.gather(*(self._check(i) for i in live))
            await asyncio.sleep(self.config.poll_interval_s)

    async def _check(self, inst: Instance) -> None:
        reason = await self.probe(inst.worker)
        if reason:
            self.mark_dead(inst.worker, reason)

    async def probe(self, worker: Worker) -> str:
        """"" when healthy, else why the instance is dead (short, client-safe)."""
        try:
            health = await asyncio.wait_for(_await(worker.actor.health.remote()),
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

    def collector(self, model_name: str) -> InstanceStatusCollector:
        return InstanceStatusCollector(self, model_name)

    @property
    def instances(self) -> list[Instance]:
        return list(self._instances.values())


class InstanceStatusCollector:
    """Prometheus collector: `pdserve_instance_status{instance,role,status}` is 1 for each
    instance's current status (0 for the others), so dashboards can count live instances."""

    def __init__(self, supervisor: Supervisor, model_name: str) -> None:
        self._supervisor = supervisor
        self._model = model_name

    def collect(self):
        family = GaugeMetricFamily("pdserve_instance_status",
                                   "1 for the instance's current lifecycle status",
                                   labels=["model_name", "instance", "role", "status"])
        for inst in self._supervisor.instances:
            for status in InstanceStatus:
                family.add_metric([self._model, inst.instance_id, inst.role, status.name.lower()],
                                  1.0 if inst.status is status else 0.0)
        yield family


async def _await(ref):
    return await ref


def _kill(worker: Worker) -> None:
    try:
        ray.kill(worker.actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        log.debug("kill of %s failed", worker.spec.instance_id, exc_info=True)
