"""The metrics every engine instance exports, whatever its role: queues, KV cache, preemptions.

The engine thread publishes them (`EngineMetrics.publish`) after each loop iteration, from its
own state; no other thread reads the engine for them. vLLM's names, so its dashboards' queries
(`num_requests_running`, `kv_cache_usage_perc`, ...) work per instance here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pdserve.metrics import MetricFactory

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine


class EngineMetrics:
    """Gauges and counters of one engine, published from its scheduler and block pool."""

    def __init__(self, factory: MetricFactory) -> None:
        self.num_running = factory.gauge("num_requests_running", "Requests in the running batch")
        self.num_waiting = factory.gauge(
            "num_requests_waiting",
            "Requests on this instance outside the running batch (queued, preempted, or, on a "
            "decode instance, reserved and waiting for their KV)")
        self.kv_cache_usage = factory.gauge("kv_cache_usage_perc",
                                            "Fraction of KV cache blocks in use, 0..1")
        self.num_preemptions = factory.counter("num_preemptions",
                                               "Requests preempted (to be recomputed)")
        self.prefix_cache_queries = factory.counter(
            "prefix_cache_queries", "Prompt tokens looked up in the prefix cache at admission")
        self.prefix_cache_hits = factory.counter(
            "prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed again)")
        self.prefix_cache_evictions = factory.counter(
            "prefix_cache_evictions", "Cached KV blocks reused for other content")
        self._seen: dict[str, int] = {}  # counters' totals already published

    def publish(self, engine: LLMEngine, num_waiting_outside: int = 0) -> None:
        """Engine thread: copy the engine's state; `num_waiting_outside` counts requests the
        worker holds outside the scheduler."""
        stats = engine.stats()
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting + num_waiting_outside)
        self.kv_cache_usage.set(stats.kv_usage)
        self._add(self.num_preemptions, "preemptions", stats.num_preemptions)
        self._add(self.prefix_cache_queries, "queries", stats.prefix_queried_tokens)
        self._add(self.prefix_cache_hits, "hits", stats.prefix_hit_tokens)
        self._add(self.prefix_cache_evictions, "evictions", stats.prefix_evictions)

    def _add(self, counter, key: str, total: int) -> None:
        """Advance `counter` to the engine's running `total`."""
        new = total - self._seen.get(key, 0)
        if new:
            counter.inc(new)
            self._seen[key] = total
