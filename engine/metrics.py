"""The metrics every engine instance exports, whatever its role: queues, KV cache, preemptions,
prefix-cache and speculative-decoding counters, and, for a MoE model, the tokens routed to
each expert and how imbalanced they are.

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
        # vLLM's spec_decode_* counters: acceptance rate = accepted / draft tokens, mean
        # accepted length = 1 + accepted / drafts
        self.spec_drafts = factory.counter(
            "spec_decode_num_drafts", "Request-steps that verified drafted tokens")
        self.spec_draft_tokens = factory.counter(
            "spec_decode_num_draft_tokens", "Tokens drafted for speculative decoding")
        self.spec_accepted_tokens = factory.counter(
            "spec_decode_num_accepted_tokens", "Drafted tokens the target model kept")
        self.triton_compiles = factory.counter(
            "triton_compiles_after_ready",
            "Triton kernel compilations after start-up, in this process (each delayed a "
            "request: a variant the warm-up missed)")
        self._seen: dict[str, int] = {}  # counters' totals already published
        self._factory = factory
        self.moe_expert_tokens = None  # pdserve:moe_expert_tokens_total by expert, MoE only
        self.moe_expert_load_imbalance = None
        self._experts_seen: tuple[int, ...] = ()  # per-expert totals already published

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
        self._add(self.spec_drafts, "spec_drafts", stats.spec_drafts)
        self._add(self.spec_draft_tokens, "spec_draft_tokens", stats.spec_draft_tokens)
        self._add(self.spec_accepted_tokens, "spec_accepted_tokens", stats.spec_accepted_tokens)
        self._add(self.triton_compiles, "triton_compiles", stats.triton_compiles_after_ready)
        if stats.expert_token_counts:
            self._add_expert_load(stats.expert_token_counts)

    def _add_expert_load(self, totals: tuple[int, ...]) -> None:
        """Advance each expert's counter to its total (summed over the MoE layers); the gauge
        is max / mean of the window since the last publish that saw new tokens."""
        if self.moe_expert_tokens is None:
            self._create_expert_metrics(len(totals))
        window = [now - before for now, before in zip(totals, self._experts_seen)]
        if not any(window):
            return
        for expert, count in enumerate(window):
            if count:
                self.moe_expert_tokens[str(expert)].inc(count)
        self.moe_expert_load_imbalance.set(imbalance(window))
        self._experts_seen = totals

    def _create_expert_metrics(self, num_experts: int) -> None:
        self.moe_expert_tokens = self._factory.counter_by(
            "moe_expert_tokens", "Tokens routed to each expert (token-slot pairs of the top-k), "
            "summed over the MoE layers this process runs", "expert",
            [str(e) for e in range(num_experts)])
        self.moe_expert_load_imbalance = self._factory.gauge(
            "moe_expert_load_imbalance", "Busiest expert's tokens over the mean expert's, in "
            "the tokens routed since the previous update (1 = balanced)")
        self._experts_seen = (0,) * num_experts

    def _add(self, counter, key: str, total: int) -> None:
        """Advance `counter` to the engine's running `total`."""
        new = total - self._seen.get(key, 0)
        if new:
            counter.inc(new)
            self._seen[key] = total


def imbalance(window: list[int]) -> float:
    """max / mean of per-expert counts (1.0 = perfectly balanced; 0.0 for an empty window)."""
    total = sum(window)
    return max(window) * len(window) / total if total else 0.0
