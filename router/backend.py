"""The interface between the gRPC layer and whatever runs the model.

The router validates a `GenerateRequest` into a `GenerationInput`, hands it to a
`GenerationBackend` and streams the backend's `TokenEvent`s back as `GenerateResponse`s. Two
backends implement it: `router.colocated.ColocatedBackend` (one engine in this process) and the
disaggregated Ray backend (prefill and decode actors with a KV transfer between them).

A request's life as the router sees it:

    validated ──generate()──> admitted ──events──> finished (last event has finish_reason)
        │                       │
        │                       ├── iterator cancelled / closed ──> aborted, blocks freed
        │                       └── abort(request_id) ─────────────> last event "abort"
        └── raises RouterError (router.errors) before or instead of the first event

Contract for every backend:
- `generate()` is an async generator. Admission errors (`OverloadedError`, ...) are raised on
  the first `__anext__`, before any event; the last event carries `finish_reason`.
- Cancelling the consuming task, or closing the iterator early (`aclose()`), aborts the request
  in every worker and frees its KV blocks; the backend never needs to be told twice.
- Sampling uses `GenerationInput.seed` (the router makes `params.seed` equal to it), so the
  prefill and the decode side draw the same noise.
- `deadline_s` is advisory for the backend (drop queued work that is already late); the router
  itself enforces it by cancelling the iterator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from protos.pdserve.v1 import generation_pb2


@dataclass(slots=True)
class GenerationInput:
    """One validated request, as every backend receives it."""

    request_id: str  # unique among requests in flight
    prompt_token_ids: list[int]  # non-empty, every id < vocab, shorter than the context
    params: SamplingParams  # params.seed == seed
    seed: int  # the client's seed, or a random one drawn by the router
    arrival_time_s: float  # time.monotonic() when the router received the call
    deadline_s: float | None = None  # time.monotonic() after which the client no longer waits
    cache_salt: str = ""  # prefix caching: only requests with the same salt share KV blocks


@dataclass(slots=True)
class Timing:
    """Where one request's time went, in seconds; 0.0 where a stage did not happen / is unknown."""

    queue_s: float = 0.0  # arrival until its prefill was first scheduled
    prefill_s: float = 0.0  # first scheduled until the first token was sampled
    kv_transfer_s: float = 0.0  # prefill -> decode KV hand-off (0 when colocated)
    ttft_s: float = 0.0  # arrival until the first token was handed to the router
    decode_s: float = 0.0  # first token until the last
    e2e_s: float = 0.0  # arrival until the last token

    def to_proto(self) -> generation_pb2.Timing:
        return generation_pb2.Timing(queue_s=self.queue_s, prefill_s=self.prefill_s,
                                     kv_transfer_s=self.kv_transfer_s, ttft_s=self.ttft_s,
                                     decode_s=self.decode_s, e2e_s=self.e2e_s)


@dataclass(slots=True)
class TokenEvent:
    """The tokens a request produced since its previous event (possibly several steps' worth)."""

    token_ids: list[int]
    text: str  # detokenized delta
    logprobs: list[float] = field(default_factory=list)  # one per token when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last event only
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # output tokens so far, this event's included
    num_cached_tokens: int = 0  # prompt tokens served from a prefix cache (last event only)
    timing: Timing | None = None  # set on the last event


class GenerationBackend(Protocol):
    """Runs validated requests on some model instances; see the module docstring for the contract."""

    async def start(self) -> None:
        """Bring the backend up; `is_ready()` is True once it returns."""

    async def stop(self) -> None:
        """Abort everything in flight, free every block and release workers, in bounded time."""

    def is_ready(self) -> bool:
        """True while new requests can be admitted."""

    def model_info(self) -> generation_pb2.ModelInfo:
        """Name, context length, vocabulary size and pools of the served model."""

    @property
    def tokenizer(self) -> Tokenizer:
        """The served model's tokenizer (the router tokenizes before admission)."""

    def generate(self, inp: GenerationInput) -> AsyncIterator[TokenEvent]:
        """Admit `inp` and stream its tokens; raises a `router.errors.RouterError` on failure."""

    async def abort(self, request_id: str) -> bool:
        """End a request's stream with finish_reason "abort"; False if it is not in flight."""

    async def cluster_state(self) -> list[generation_pb2.InstanceState]:
        """Every model instance as last seen: role, KV blocks, queue depths."""

    async def drain_instance(self, instance_id: str, timeout_s: float | None) -> int:
        """Take one instance out of service once its requests finished or moved (None: the
        configured drain timeout); how many moved. InvalidRequestError if it cannot be."""
