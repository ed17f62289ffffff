"""Routing policies: which (prefill, decode) pair of instances runs a request.

A policy is pure: it sees a `RequestView` and one candidate per READY instance, each carrying
the load the router counts for it, and ranks them. It owns no state but its own (a
round-robin cursor); the load bookkeeping, the prefix index and the calls to the instances are
the backend's (cluster/routing.py). Selected by the cluster config's `routing.policy`:

    kv_aware      (default) the pair of least predicted work. Its score is the sum of
                    prefill  the tokens the prefill instance must compute before this request's
                             first token: its queued tokens (assigned by the router, not yet
                             answered) plus this request's tokens it does not cache (predicted
                             from its block-hash events, router/prefix_index.py)
                    decode   its requests in flight x `decode_request_cost_tokens`, plus its KV
                             usage after this request x `decode_kv_cost_tokens`; an instance
                             whose free blocks cannot hold the request ranks last
                  The two parts are independent, so the best pair is the best of each.
    least_loaded  the behaviour before prefix caching: the prefill instance with the fewest
                  queued tokens; the decode instance with the most free blocks, then the fewest
                  requests in flight
    round_robin   each pool in turn, ignoring load and caches (a baseline)

Ties keep the candidates' order (the pool's order). Load counted by the router (queued tokens,
requests in flight, reservations) changes the moment a request is assigned, so a burst spreads
instead of landing on the instance that looked emptiest when it began.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

POLICIES = ("kv_aware", "least_loaded", "round_robin")


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """The `routing` section of the cluster config."""

    policy: str = "kv_aware"  # one of POLICIES
    # kv_aware: one request in flight on a decode instance weighs as much as this many prompt
    # tokens of prefill work, and a decode KV pool that this request would fill completely as
    # many as `decode_kv_cost_tokens` (scaled by the usage it would leave)
    decode_request_cost_tokens: float = 16.0
    decode_kv_cost_tokens: float = 512.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"routing.policy must be one of {', '.join(POLICIES)}, "
                             f"got {self.policy!r}")
        for name in ("decode_request_cost_tokens", "decode_kv_cost_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"routing.{name} must be a number, got {value!r}")
            if value < 0:
                raise ValueError(f"routing.{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class RequestView:
    """What a policy knows of the request: its length and its blocks' names."""

    num_tokens: int  # prompt + tokens already streamed: what the prefill computes
    block_hashes: tuple[int, ...]  # its full blocks a cache hit may cover (prefix_index.py)
    block_size: int


@dataclass(frozen=True, slots=True)
class PrefillCandidate:
    instance_id: str
    num_queued_tokens: int  # tokens assigned to it and not answered yet
    num_cached_tokens: int  # of this request, predicted from its events


@dataclass(frozen=True, slots=True)
class DecodeCandidate:
    instance_id: str
    num_free_blocks: int  # last known, minus the blocks of reservations still in flight
    num_blocks: int
    num_requests: int  # assigned to it and not finished (counted by the router)
    num_blocks_needed: int  # this request's

    @property
    def fits(self) -> bool:
        return self.num_free_blocks >= self.num_blocks_needed


@dataclass(frozen=True, slots=True)
class RouteChoice:
    """The chosen prefill instance and the decode instances best first (a refused reservation
    tries the next)."""

    prefill: PrefillCandidate
    decode_order: tuple[DecodeCandidate, ...]

    @property
    def decode(self) -> DecodeCandidate:
        return self.decode_order[0]


class RoutingPolicy(Protocol):
    name: str

    def choose(self, request: RequestView, prefill: Sequence[PrefillCandidate],
               decode: Sequence[DecodeCandidate]) -> RouteChoice:
        """Rank the (non-empty) candidates for `request`."""
        ...


class KVAwarePolicy:
    """The pair of least predicted work (prefix hits, queued prefill, decode load)."""

    name = "kv_aware"

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config

    def prefill_cost(self, request: RequestView, c: PrefillCandidate) -> float:
        return c.num_queued_tokens + max(0, request.num_tokens - c.num_cached_tokens)

    def decode_cost(self, c: DecodeCandidate) -> float:
        if not c.fits:
            return float("inf")
        used_after = c.num_blocks - c.num_free_blocks + c.num_blocks_needed
        usage = used_after / c.num_blocks if c.num_blocks else 1.0
        return (c.num_requests * self.config.decode_request_cost_tokens
                + usage * self.config.decode_kv_cost_tokens)

    def choose(self, request: RequestView, prefill: Sequence[PrefillCandidate],
               decode: Sequence[DecodeCandidate]) -> RouteChoice:
        best = min(prefill, key=lambda c: self.prefill_cost(request, c))
        return RouteChoice(best, tuple(sorted(decode, key=self.decode_cost)))


class LeastLoadedPolicy:
    """Fewest queued prefill tokens; most free decode blocks, then fewest requests."""

    name = "least_loaded"

    def choose(self, request: RequestView, prefill: Sequence[PrefillCandidate],
               decode: Sequence[DecodeCandidate]) -> RouteChoice:
        best = min(prefill, key=lambda c: c.num_queued_tokens)
        order = sorted(decode, key=lambda c: (-c.num_free_blocks, c.num_requests))
        return RouteChoice(best, tuple(order))


class RoundRobinPolicy:
    """Each pool in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next_prefill = 0
        self._next_decode = 0

    def choose(self, request: RequestView, prefill: Sequence[PrefillCandidate],
               decode: Sequence[DecodeCandidate]) -> RouteChoice:
        best = prefill[self._next_prefill % len(prefill)]
        start = self._next_decode % len(decode)
        self._next_prefill += 1
        self._next_decode += 1
        return RouteChoice(best, tuple(decode[start:]) + tuple(decode[:start]))


def make_policy(config: RoutingConfig) -> RoutingPolicy:
    if config.policy == "kv_aware":
        return KVAwarePolicy(config)
    if config.policy == "least_loaded":
        return LeastLoadedPolicy()
    return RoundRobinPolicy()
