"""The engine API: add requests, step, abort, stream outputs; `generate` for offline use.

A step is three calls: the scheduler plans, the runner launches, the engine post-processes
(append sampled tokens, detokenize, finish requests and free their blocks). With asynchronous
scheduling (engine/inflight.py) a `step()` plans and launches step N+1 first and post-processes
step N after, while the GPU runs N+1; its outputs are then those of step N.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Sequence

from engine.attention import get_backend
from engine.builder import LoadedModel, load_model, make_kv_cache
from engine.config import EngineConfig
from engine.inflight import InFlightStep, Readback
from engine.kv_cache.block_table import KVCacheManager, num_blocks_for
from engine.model_runner import ModelRunner
from engine.output_processor import RequestStream, stop_token_ids
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput


class LLMEngine:
    """One model instance on one device with its paged KV cache and continuous batching."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        loaded = loaded or load_model(config)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = min(config.max_model_len or loaded.config.max_position_embeddings,
                                 loaded.config.max_position_embeddings)
        self.kv_cache = make_kv_cache(loaded.config, config)
        block_size = config.cache.block_size
        self.kv_manager = KVCacheManager(self.kv_cache.shape[1], block_size)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager)
        backend = get_backend(config.attention_backend, config.device)
        self.runner = ModelRunner(loaded.model, self.kv_cache, backend, block_size,
                                  loaded.config.vocab_size, config.device,
                                  use_cuda_graphs=config.use_cuda_graphs,
                                  max_model_len=self.max_model_len,
                                  max_num_seqs=config.scheduler.max_num_seqs)
        if self.runner.decode_graphs is not None:  # at start, not at a request's first step
            self.runner.decode_graphs.capture_up_to(config.scheduler.max_num_seqs)
        self.async_scheduling = config.use_async_scheduling
        self._readback = Readback(self.runner.sampled_ids.shape[0], self.runner.device)
        self._in_flight: InFlightStep | None = None  # launched, not yet read back
        self.requests: dict[str, Request] = {}
        self.streams: dict[str, RequestStream] = {}

    # ---- requests -------------------------------------------------------------------------
    def make_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                     request_id: str | None = None, seed: int | None = None,
                     output_token_ids: Sequence[int] = ()) -> Request:
        """Validate and build a request (not yet queued). `seed` overrides `params.seed`: the
        router fixes one per request so prefill and decode instances sample alike.

        `output_token_ids` are tokens already streamed to the client (a migrated request): the
        request resumes after them. Its first step computes the KV of prompt + these and samples
        output index len(output_token_ids); with the same seed that is the token the
        uninterrupted run sampled there. `params.max_tokens` still counts every output."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests or self.kv_manager.block_table(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        outputs = [int(t) for t in output_token_ids]
        self._validate_prompt(prompt, params)
        self._validate_outputs(prompt, outputs, params)
        if seed is None:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Request(request_id, prompt, params, seed, self.max_model_len,
                       output_token_ids=outputs)

    def _validate_prompt(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("prompt is empty: it must contain at least one token")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt is {len(prompt)} tokens; the model's context length is "
                             f"{self.max_model_len}, leaving no room to generate")
        vocab = self.model_config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {min(prompt)}..{max(prompt)}")
        longest = min(len(prompt) + params.max_tokens, self.max_model_len)
        needed = num_blocks_for(longest, self.kv_manager.block_size)
        if needed > self.kv_manager.num_blocks:
            raise ValueError(f"request needs up to {needed} KV blocks but the pool has only "
                             f"{self.kv_manager.num_blocks}; lower max_tokens or grow the cache")

    def _validate_outputs(self, prompt: list[int], outputs: list[int],
                          params: SamplingParams) -> None:
        """Resumed outputs must leave the request unfinished (stop strings: `track` checks)."""
        if not outputs:
            return
        vocab = self.model_config.vocab_size
        if min(outputs) < 0 or max(outputs) >= vocab:
            raise ValueError(f"output token ids must be in [0, {vocab}), "
                             f"got {min(outputs)}..{max(outputs)}")
        if len(prompt) + len(outputs) >= self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)}) + output ({len(outputs)}) tokens reach the "
                             f"model's context length {self.max_model_len}: no room to generate")
        if len(outputs) >= params.max_tokens:
            raise ValueError(f"{len(outputs)} output tokens already reach max_tokens "
                             f"{params.max_tokens}: the request had already finished")
        stops = stop_token_ids(params, self.tokenizer.eos_token_ids)
        ended = [i for i, token_id in enumerate(outputs) if token_id in stops]
        if ended:
            raise ValueError(f"output_token_ids[{ended[0]}] = {outputs[ended[0]]} is a stop "
                             "token: the request had already finished")

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        request = self.make_request(prompt_token_ids, params, request_id)
        self.scheduler.add(request)
        self.track(request)
        return request.request_id

    def track(self, request: Request) -> None:
        """Start the output stream of a request built by `make_request`; a resumed request's
        outputs are replayed into it first. Raises ValueError, tracking nothing, if they
        complete a stop string (the request had already finished)."""
        stream = RequestStream(request, self.tokenizer, self.tokenizer.eos_token_ids)
        stream.replay(request.output_token_ids)
        self.requests[request.request_id] = request
        self.streams[request.request_id] = stream

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; None if it is unknown/finished."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._end(request, RequestStatus.FINISHED_ABORTED)
        self.forget(request)
        return RequestOutput(request_id, [], "", True, "abort", [], request.num_prompt_tokens,
                             len(request.output_token_ids))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    # ---- stepping ------------------------------------------------------------------------
    def step(self, on_layer_done: Callable[[int], None] | None = None) -> list[RequestOutput]:
        """Plan and launch one step; returns the outputs of the step it reads back: this one
        (synchronous) or the previous one (asynchronous scheduling)."""
        previous, self._in_flight = self._in_flight, None
        outputs: list[RequestOutput] = []
        if previous is not None and not self._can_overlap(previous, on_layer_done):
            outputs += self._read_back(previous)
            previous = None
        plan = self.scheduler.schedule()
        if not plan.is_empty:
            self._in_flight = self._launch(plan, on_layer_done)
        if previous is not None:
            outputs += self._read_back(previous)
        if not self.async_scheduling and self._in_flight is not None:
            current, self._in_flight = self._in_flight, None
            outputs += self._read_back(current)
        return outputs

    def _can_overlap(self, previous: InFlightStep, on_layer_done) -> bool:
        """Whether the next step may launch before `previous` is read: not for hooked (layer
        streamed) steps, nor when a repetition penalty needs every token id on the host."""
        return (self.async_scheduling and on_layer_done is None
                and all(c.request.params.repetition_penalty == 1.0
                        for c in previous.sampling_chunks))

    def _launch(self, plan: SchedulerOutput, on_layer_done) -> InFlightStep:
        sampled = self.runner.execute(plan, on_layer_done)
        self.scheduler.on_step_done(plan)
        chunks = [c for c in plan.chunks if c.samples]
        for row, chunk in enumerate(chunks):  # the runner feeds the next step from these rows
            chunk.request.num_inflight_tokens += 1
            chunk.request.inflight_row = row
        ids, logprobs, ready = self._readback.start(sampled)
        return InFlightStep(chunks, frozenset(c.request.request_id for c in plan.chunks),
                            ids, logprobs, ready)

    def _read_back(self, step: InFlightStep) -> list[RequestOutput]:
        """Append each sampled token to its request, stream text, finish what is done. Tokens
        of requests that ended meanwhile (aborted, or stopped at the step before) are dropped."""
        token_ids, logprobs = step.wait()  # the step's only host sync
        outputs = []
        for i, chunk in enumerate(step.sampling_chunks):
            request = chunk.request
            request.num_inflight_tokens -= 1
            if request.is_finished or request.request_id not in self.requests:
                continue
            lp = logprobs[i] if logprobs is not None else None
            outputs.append(self.append_token(request, token_ids[i], lp))
        for request_id in step.deferred_frees:
            self.kv_manager.free(request_id)
        return outputs

    def append_token(self, request: Request, token_id: int, logprob: float | None) -> RequestOutput:
        """Record a sampled token and finish the request (freeing its blocks) if it is done."""
        out = self.record_token(request, token_id, logprob)
        if out.finished:
            self.finish_request(request, out.finish_reason)
        return out

    def finish_request(self, request: Request, finish_reason: str) -> None:
        status = RequestStatus.FINISHED_STOPPED if finish_reason == "stop" else RequestStatus.FINISHED_LENGTH
        self._end(request, status)
        self.forget(request)

    def _end(self, request: Request, status: RequestStatus) -> None:
        """Finish a request; its blocks return to the pool now, or, if the step in flight
        computes it, once that step is read back (the GPU may still be writing them)."""
        flight = self._in_flight
        if flight is not None and request.request_id in flight.request_ids:
            self.scheduler.finish(request, status, free_blocks=False)
            flight.deferred_frees.append(request.request_id)
        else:
            self.scheduler.finish(request, status)

    def record_token(self, request: Request, token_id: int, logprob: float | None) -> RequestOutput:
        """Append a token to the request and its text stream; no effect on the scheduler."""
        now = time.monotonic()
        request.output_token_ids.append(token_id)
        if request.first_token_time_s is None:
            request.first_token_time_s = now
        new_logprobs = []
        if logprob is not None and request.params.logprobs:
            request.output_logprobs.append(logprob)
            new_logprobs = [logprob]
        delta, reason = self.streams[request.request_id].on_token(token_id)
        return RequestOutput(request.request_id, [token_id], delta, reason is not None, reason,
                             new_logprobs, request.num_prompt_tokens, len(request.output_token_ids))

    def forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self.streams.pop(request.request_id, None)

    # ---- offline ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams]) -> list[CompletionOutput]:
        """Run every prompt to completion as one continuously batched workload."""
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        ids = [self.add_request(t, sp) for t, sp in zip(token_lists, params_list)]
        results = {rid: CompletionOutput(rid, toks, [], "", "") for rid, toks in zip(ids, token_lists)}
        while self.has_unfinished():
            for out in self.step():
                res = results[out.request_id]
                res.token_ids += out.new_token_ids
                res.logprobs += out.new_logprobs
                res.text += out.text_delta
                if out.finished:
                    res.finish_reason = out.finish_reason
        return [results[rid] for rid in ids]
