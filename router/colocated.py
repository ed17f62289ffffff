"""`ColocatedBackend`: prefill and decode on one `LLMEngine` in this process.

Two threads meet here, and only through two hand-offs:

    event loop ── _Add / _Abort commands (deque + Condition) ──────────────> engine thread
    event loop <── one call_soon_threadsafe per engine step with that step's deliveries ──┘

The engine thread owns the engine: every engine call (add, abort, step) happens on it, so the
engine needs no locks. It applies the pending commands, runs one step while there is work, and
sleeps on the condition when there is none. Each step's outputs are batched into ONE
`call_soon_threadsafe`, which spreads them over the per-request `asyncio.Queue`s; a consumer
that lags behind merges whatever has piled up into one `TokenEvent`.

The event loop owns the per-request queues. A request leaves them when its stream ends in any
way; if it ended early (cancelled, closed, deadline), an `_Abort` goes to the engine thread,
which frees the request's blocks before its next step.

Cluster state: the backend reports ONE instance with role INSTANCE_ROLE_UNSPECIFIED, which we
define as "prefill and decode colocated" (the proto's roles are exclusive, so neither PREFILL
nor DECODE alone would be true). Its numbers are a snapshot the engine thread publishes after
every iteration, never read from the engine by another thread.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request
from engine.scheduler import QueueFullError
from engine.tokenizer import Tokenizer
from protos.pdserve.v1 import generation_pb2
from router.backend import GenerationInput, Timing, TokenEvent
from router.errors import (DuplicateRequestError, InvalidRequestError, OverloadedError,
                           RequestFailedError, RouterError, UnavailableError)

logger = logging.getLogger(__name__)

INSTANCE_ID = "colocated-0"
POOL_NAME = "colocated"


@dataclass(slots=True)
class _Add:
    inp: GenerationInput


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Delivery:
    """What the engine thread hands the event loop for one request: an output or an error."""

    request_id: str
    output: RequestOutput | None = None
    error: RouterError | None = None
    queue_s: float = 0.0  # set with the finishing output
    prefill_s: float = 0.0
    num_cached_tokens: int = 0  # set with the finishing output: its prefix-cache hit


@dataclass(frozen=True, slots=True)
class _EngineStats:
    """A snapshot published by the engine thread for `cluster_state()`."""

    total_kv_blocks: int
    free_kv_blocks: int
    num_running: int
    num_waiting: int
    expert_token_counts: tuple[int, ...] = ()  # MoE: tokens routed to each expert


class ColocatedBackend:
    """A `GenerationBackend` over one engine, stepped by one thread it owns.

    `max_queued_requests` bounds the outstanding requests (admitted, not yet finished: queued
    in the command queue, waiting or running in the engine); one more is refused at once with
    `OverloadedError`. `stop_timeout_s` bounds how long `stop()` waits for the current step.
    """

    def __init__(self, engine: LLMEngine, max_queued_requests: int = 256,
                 stop_timeout_s: float = 10.0) -> None:
        if max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be >= 1, got {max_queued_requests}")
        self._engine = engine
        self._max_queued_requests = max_queued_requests
        self._stop_timeout_s = stop_timeout_s
        self._commands: deque[_Add | _Abort] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[_Delivery]] = {}  # event loop thread only
        self._tracked: dict[str, Request] = {}  # engine thread only
        self._stats = self._snapshot()
        self._model_info = self._make_model_info()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("ColocatedBackend.start() called twice")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, self._stop_timeout_s)
            if self._thread.is_alive():
                logger.error("engine thread still busy %.1f s after stop()", self._stop_timeout_s)
        self._fail_all(UnavailableError("the server is shutting down"))

    def is_ready(self) -> bool:
        alive = self._thread is not None and self._thread.is_alive()
        return alive and not self._stopping

    def model_info(self) -> generation_pb2.ModelInfo:
        return self._model_info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._engine.tokenizer

    # ---- requests (event loop thread) ----------------------------------------------------------
    async def generate(self, inp: GenerationInput) -> AsyncIterator[TokenEvent]:
        queue = self._admit(inp.request_id)
        self._send(_Add(inp))
        finished = False
        first_token_s: float | None = None
        try:
            while not finished:
                deliveries = [await queue.get()]
                while not queue.empty():  # the consumer lagged: send what piled up as one event
                    deliveries.append(queue.get_nowait())
                event = _merge(deliveries)  # raises the delivered error, if any
                if first_token_s is None and event.token_ids:
                    first_token_s = time.monotonic()
                finished = event.finish_reason is not None
                if finished:
                    event.timing = _timing(inp.arrival_time_s, first_token_s, deliveries[-1])
                yield event
        except RouterError:
            finished = True  # an error delivery means the engine does not hold the request
            raise
        finally:
            del self._queues[inp.request_id]
            if not finished:
                self._send(_Abort(inp.request_id))

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._queues:
            return False
        self._send(_Abort(request_id))
        return True

    async def drain_instance(self, instance_id: str, timeout_s: float | None) -> int:
        raise InvalidRequestError("instance_id", "a colocated server has one engine and no pool "
                                  "to move its requests to; drain the server (SIGTERM) instead")

    async def cluster_state(self) -> list[generation_pb2.InstanceState]:
        stats = self._stats
        return [generation_pb2.InstanceState(
            instance_id=INSTANCE_ID, role=generation_pb2.INSTANCE_ROLE_UNSPECIFIED,
            address=socket.gethostname(), device=str(self._engine.config.device),
            total_kv_blocks=stats.total_kv_blocks, free_kv_blocks=stats.free_kv_blocks,
            num_running_requests=stats.num_running, num_waiting_requests=stats.num_waiting,
            expert_token_counts=stats.expert_token_counts)]

    def _admit(self, request_id: str) -> asyncio.Queue[_Delivery]:
        if not self.is_ready():
            raise UnavailableError("the engine is not running (starting, stopping or failed)")
        if request_id in self._queues:
            raise DuplicateRequestError(request_id)
        if len(self._queues) >= self._max_queued_requests:
            raise OverloadedError(f"{len(self._queues)} requests outstanding, the limit is "
                                  f"{self._max_queued_requests}; retry later")
        queue: asyncio.Queue[_Delivery] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def _send(self, command: _Add | _Abort) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _dispatch(self, deliveries: list[_Delivery]) -> None:
        for delivery in deliveries:
            queue = self._queues.get(delivery.request_id)
            if queue is not None:  # None: the stream already ended (cancelled)
                queue.put_nowait(delivery)

    def _fail_all(self, error: RouterError) -> None:
        self._dispatch([_Delivery(rid, error=error) for rid in self._queues])

    # ---- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            device = self._engine.kv_cache.device
            if device.type == "cuda":  # CUDA's current device is per thread: the engine's
                import torch

                torch.cuda.set_device(device)
            while (commands := self._wait_for_work()) is not None:
                deliveries = [d for command in commands if (d := self._apply(command))]
                if self._engine.has_unfinished():
                    deliveries += self._step()
                self._stats = self._snapshot()
                if deliveries:
                    self._deliver(deliveries)
        except Exception:  # an engine bug: fail every stream instead of leaving it hanging
            logger.exception("engine thread crashed; failing every request in flight")
            self._stopping = True
            self._deliver_to_loop(self._fail_all, RequestFailedError(
                "the engine failed while running this request", retryable=False))
        finally:
            self._abort_everything()

    def _wait_for_work(self) -> list[_Add | _Abort] | None:
        with self._wakeup:
            while not (self._commands or self._stopping or self._engine.has_unfinished()):
                self._wakeup.wait()
            if self._stopping:
                return None
            commands = list(self._commands)
            self._commands.clear()
            return commands

    def _apply(self, command: _Add | _Abort) -> _Delivery | None:
        if isinstance(command, _Abort):
            return self._abort(command.request_id)
        inp = command.inp
        try:
            if inp.request_id in self._engine.requests:  # its abort has not been applied yet
                raise DuplicateRequestError(inp.request_id)
            self._engine.add_request(inp.prompt_token_ids, inp.params, inp.request_id)
            self._engine.requests[inp.request_id].cache_salt = inp.cache_salt  # before its step
        except QueueFullError as error:
            return _Delivery(inp.request_id, error=OverloadedError(str(error)))
        except DuplicateRequestError as error:
            return _Delivery(inp.request_id, error=error)
        except ValueError as error:  # the router checked the prompt: what is left is KV sizing
            return _Delivery(inp.request_id,
                             error=InvalidRequestError("sampling.max_tokens", str(error)))
        request = self._engine.requests[inp.request_id]
        request.arrival_time_s = inp.arrival_time_s  # the router's arrival is the true one
        self._tracked[inp.request_id] = request
        return None

    def _abort(self, request_id: str) -> _Delivery | None:
        request = self._tracked.pop(request_id, None)
        output = self._engine.abort(request_id)
        if output is None or request is None:
            return None  # it finished (or failed to start) before the abort arrived
        queue_s, prefill_s = _engine_times(request)
        return _Delivery(request_id, output, queue_s=queue_s, prefill_s=prefill_s)

    def _step(self) -> list[_Delivery]:
        deliveries = []
        for output in self._engine.step():
            delivery = _Delivery(output.request_id, output)
            if output.finished:
                request = self._tracked.pop(output.request_id)
                delivery.queue_s, delivery.prefill_s = _engine_times(request)
                delivery.num_cached_tokens = request.num_cached_tokens
            deliveries.append(delivery)
        return deliveries

    def _deliver(self, deliveries: list[_Delivery]) -> None:
        self._deliver_to_loop(self._dispatch, deliveries)

    def _deliver_to_loop(self, callback, argument) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, argument)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _abort_everything(self) -> None:
        for request_id in list(self._engine.requests):
            self._engine.abort(request_id)
        self._tracked.clear()
        self._stats = self._snapshot()

    def _snapshot(self) -> _EngineStats:
        stats = self._engine.stats()
        return _EngineStats(stats.num_blocks, stats.num_free_blocks, stats.num_running,
                            stats.num_waiting, stats.expert_token_counts)

    def _make_model_info(self) -> generation_pb2.ModelInfo:
        config = self._engine.model_config
        pool = generation_pb2.PoolInfo(name=POOL_NAME, role=generation_pb2.INSTANCE_ROLE_UNSPECIFIED,
                                       num_instances=1)
        return generation_pb2.ModelInfo(model_name=config.name,
                                        context_length=self._engine.max_model_len,
                                        vocab_size=config.vocab_size, pools=[pool])


def _merge(deliveries: list[_Delivery]) -> TokenEvent:
    """One event from the deliveries of consecutive steps (usually just one)."""
    last = deliveries[-1]
    for delivery in deliveries:
        if delivery.error is not None:
            raise delivery.error
    if len(deliveries) == 1:
        out = last.output
        return TokenEvent(out.new_token_ids, out.text_delta, out.new_logprobs, out.finish_reason,
                          out.num_prompt_tokens, out.num_output_tokens,
                          num_cached_tokens=last.num_cached_tokens)
    outputs = [d.output for d in deliveries]
    return TokenEvent([t for o in outputs for t in o.new_token_ids],
                      "".join(o.text_delta for o in outputs),
                      [lp for o in outputs for lp in o.new_logprobs], last.output.finish_reason,
                      last.output.num_prompt_tokens, last.output.num_output_tokens,
                      num_cached_tokens=last.num_cached_tokens)


def _engine_times(request: Request) -> tuple[float, float]:
    """(queue_s, prefill_s) of a finished request, 0.0 for stages it never reached."""
    scheduled = request.first_scheduled_time_s
    if scheduled is None:
        return 0.0, 0.0
    first_token = request.first_token_time_s
    prefill_s = first_token - scheduled if first_token is not None else 0.0
    return scheduled - request.arrival_time_s, prefill_s


def _timing(arrival_s: float, first_token_s: float | None, last: _Delivery) -> Timing:
    now = time.monotonic()
    ttft_s = first_token_s - arrival_s if first_token_s is not None else 0.0
    decode_s = now - first_token_s if first_token_s is not None else 0.0
    return Timing(queue_s=last.queue_s, prefill_s=last.prefill_s, ttft_s=ttft_s,
                  decode_s=decode_s, e2e_s=now - arrival_s)
