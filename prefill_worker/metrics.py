"""A prefill instance's metrics: its engine's (engine.metrics), its sends (kv_transfer.metrics),
and the prefill-specific ones below, all in the instance's own registry, served by its actor.

    per loop iteration   num_prompt_tokens_waiting, transfers in flight, the engine gauges
    per engine step      iteration_tokens (tokens computed in the step)
    per hand-off         request_queue_time (arrival here to first scheduled) and
                         request_prefill_time (first scheduled to first token sampled)
"""

from __future__ import annotations


from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from engine.metrics import EngineMetrics
from kv_transfer.metrics import TransferMetrics
from pdserve.metrics import REQUEST_LATENCY_BUCKETS_S, MetricFactory

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine

# vLLM's iteration_tokens_total buckets (up to its largest batch-token budgets).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class PrefillMetrics:
    """Every metric of one prefill instance."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        f = MetricFactory(model_name, self.registry)
        self.engine = EngineMetrics(f)
        self.transfer = TransferMetrics(f)
        self.num_prompt_tokens_waiting = f.gauge(
            "num_prompt_tokens_waiting",
            "Prompt tokens queued or partly prefilled, not yet computed")
        self.iteration_tokens = f.histogram("iteration_tokens_total", "Tokens per engine step",
                                            ITERATION_TOKENS_BUCKETS)
        self.queue_time = f.histogram("request_queue_time_seconds",
                                      "Arrival at this instance until first scheduled",
                                      REQUEST_LATENCY_BUCKETS_S)
        self.prefill_time = f.histogram("request_prefill_time_seconds",
                                        "First scheduled until the first token was sampled",
                                        REQUEST_LATENCY_BUCKETS_S)

    def publish(self, engine: LLMEngine, num_transfers_in_flight: int) -> None:
        """Engine thread, after each loop iteration."""
        self.engine.publish(engine)
        self.num_prompt_tokens_waiting.set(engine.stats().num_pending_tokens)
        self.transfer.in_flight.set(num_transfers_in_flight)
