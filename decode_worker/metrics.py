"""A decode instance's metrics: its engine's (engine.metrics), its receives
(kv_transfer.metrics), and the decode-specific ones below, all in the instance's own registry,
served by its actor.

    per loop iteration   the engine gauges (waiting includes reservations awaiting their KV),
                         transfers in flight
    per engine step      decode_batch_size (requests that got a token in the step)
    per finished request request_decode_time (admitted with its first token until finished)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from engine.metrics import EngineMetrics
from kv_transfer.metrics import TransferMetrics
from pdserve.metrics import REQUEST_LATENCY_BUCKETS_S, MetricFactory

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class DecodeMetrics:
    """Every metric of one decode instance."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        f = MetricFactory(model_name, self.registry)
        self.engine = EngineMetrics(f)
        self.transfer = TransferMetrics(f)
        self.batch_size = f.histogram("decode_batch_size", "Requests that got a token per step",
                                      BATCH_SIZE_BUCKETS)
        self.decode_time = f.histogram("request_decode_time_seconds",
                                       "Admitted with its first token until finished",
                                       REQUEST_LATENCY_BUCKETS_S)

    def publish(self, engine: LLMEngine, num_reserved: int, num_transfers_in_flight: int) -> None:
        """Engine thread, after each loop iteration."""
        self.engine.publish(engine, num_waiting_outside=num_reserved)
        self.transfer.in_flight.set(num_transfers_in_flight)
