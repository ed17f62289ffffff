"""The executor of a one-rank instance: the model runner in this process, on this device.

Exactly the single-device fast path: decode steps replay CUDA graphs (captured for every batch
bucket up to `max_num_seqs` when the executor starts), sampled ids are copied to pinned host
buffers behind the step, and `StepHandle.wait` waits for that copy's event only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention import get_backend
from engine.builder import LoadedModel, make_kv_cache
from engine.config import EngineConfig
from engine.executor.base import LayerListener
from engine.inflight import Readback
from engine.model_runner import ModelRunner
from engine.plan import StepPlan, StepResult, graph_rows
from engine.spec.draft_runner import DraftRunner, load_draft_model, shared_num_blocks


@dataclass(slots=True)
class LocalStepHandle:
    """A launched step: where and when its sampled ids land on the host."""

    step_id: int
    num_sampled: int
    token_ids: torch.Tensor | None  # host, valid once `ready` has fired
    logprobs: torch.Tensor | None
    ready: torch.cuda.Event | None  # None on CPU: the copies were synchronous

    def wait(self) -> StepResult:
        if self.ready is not None:
            self.ready.synchronize()
        if self.token_ids is None:
            return StepResult(self.step_id, [])
        n = self.num_sampled
        logprobs = self.logprobs[:n].tolist() if self.logprobs is not None else None
        return StepResult(self.step_id, self.token_ids[:n].tolist(), logprobs)


class LocalExecutor:
    """One rank, in process: owns the model, the KV cache tensor and the model runner (and,
    for draft-model speculative decoding, the draft's `DraftRunner`)."""

    def __init__(self, config: EngineConfig, loaded: LoadedModel, max_model_len: int) -> None:
        # speculative decoding with a draft model: its weights load first, and its cache has
        # the target cache's block ids (engine/spec/draft_runner.py)
        draft = None
        num_blocks = None
        if config.speculative.method == "draft_model":
            draft = load_draft_model(config, loaded.config)
            num_blocks = shared_num_blocks(config, loaded.config, draft[0])
        self.kv_cache = make_kv_cache(loaded.config, config, num_blocks=num_blocks)
        self.num_blocks = self.kv_cache.shape[1]
        self.drafter = (DraftRunner(config, *draft, self.num_blocks, max_model_len)
                        if draft is not None else None)
        backend = get_backend(config.attention_backend, config.device)
        self.runner = ModelRunner(loaded.model, self.kv_cache, backend, config.cache.block_size,
                                  loaded.config.vocab_size, config.device,
                                  use_cuda_graphs=config.use_cuda_graphs,
                                  max_model_len=max_model_len,
                                  max_num_seqs=config.scheduler.max_num_seqs)
        self.device = self.runner.device
        if self.runner.decode_graphs is not None:  # at start, not at a request's first step
            # (graph_rows: decodes, verifications, and prompts up to graph_prefill_max_context)
            self.runner.decode_graphs.capture_up_to(graph_rows(config))
        self._readback = Readback(self.runner.sampled_ids.shape[0], self.device)

    def launch(self, plan: StepPlan, layer_listener: LayerListener | None = None
               ) -> LocalStepHandle:
        sampled = self.runner.execute(plan, layer_listener)
        ids, logprobs, ready = self._readback.start(sampled)
        return LocalStepHandle(plan.step_id, plan.num_sampled, ids, logprobs, ready)

    def shutdown(self) -> None:
        """Nothing to stop: the runner lives and dies with this process."""

