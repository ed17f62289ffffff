"""The cluster's own Prometheus metrics, served on the router's /metrics next to the client's view:

    pdserve:instance_status{instance_id,pool,status} 1 for each slot's current lifecycle status
    pdserve:instance_restarts_total{instance_id,pool} times the slot was refilled after a death
    pdserve:instance_restart_failures_total{...}    replacements that failed to start or join
    pdserve:request_migrations_total{cause}         requests moved to other instances, by the
                                                     role lost ("prefill", "decode"), "transfer"
                                                     (a failed KV hand-off) or "drain"
    pdserve:request_migration_failures_total{reason} moves given up: "limit" (the request's
                                                     migrations were used up), "no_instance"
                                                     (none became ready in time), "shutdown"
    pdserve:request_migration_gap_seconds           loss detected -> the moved request's next
                                                     token (what its client sees as a stall)
    pdserve:drain_duration_seconds                   the last drain: started -> every request done

The slot and its pool are labelled `instance_id` and `pool`, not `instance` and `role`: these
series come from the router's /metrics, whose scrape target already carries `instance` and
`role` (cluster/metrics_sd.py), and Prometheus would rename clashing labels to `exported_*`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cluster.lifecycle import InstanceStatus, Supervisor
from pdserve.metrics import PREFIX, REQUEST_LATENCY_BUCKETS_S, MetricFactory

MIGRATION_CAUSES = ("prefill", "decode", "transfer", "drain")
MIGRATION_FAILURES = ("limit", "no_instance", "shutdown")


class ClusterMetrics:
    """Migration and drain metrics of the disaggregated backend, in a registry of their own
    (the serving cluster registers it, and the supervisor's collector, with the router's)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        factory = MetricFactory(model_name, self.registry)
        self.migrations = factory.counter_by(
            "request_migrations", "Requests moved to other instances, by cause", "cause",
            MIGRATION_CAUSES)
        self.migration_failures = factory.counter_by(
            "request_migration_failures", "Requests whose move was given up, by reason",
            "reason", MIGRATION_FAILURES)
        self.migration_gap = factory.histogram(
            "request_migration_gap_seconds",
            "Loss of an instance detected -> the moved request's next token",
            REQUEST_LATENCY_BUCKETS_S)
        self.drain_duration = factory.gauge(
            "drain_duration_seconds", "The last drain: started -> every request done")


class InstanceStatusCollector:
    """`instance_status`, `instance_restarts` and `instance_restart_failures`, read from the
    supervisor's records at each scrape."""

    def __init__(self, supervisor: Supervisor, model_name: str) -> None:
        self._supervisor = supervisor
        self._model = model_name

    def collect(self):
        labels = ["model_name", "instance_id", "pool"]
        status = GaugeMetricFamily(PREFIX + "instance_status",
                                   "1 for the instance's current lifecycle status",
                                   labels=labels + ["status"])
        restarts = CounterMetricFamily(PREFIX + "instance_restarts",
                                       "Times the instance's slot was refilled after a death",
                                       labels=labels)
        failed = CounterMetricFamily(PREFIX + "instance_restart_failures",
                                     "Replacements that failed to start or to join",
                                     labels=labels)
        for inst in self._supervisor.instances:
            key = [self._model, inst.instance_id, inst.role]
            for value in InstanceStatus:
                status.add_metric(key + [value.name.lower()], 1.0 if inst.status is value else 0.0)
            restarts.add_metric(key, inst.incarnation)
            failed.add_metric(key, inst.restart_failures)
        yield status
        yield restarts
        yield failed
