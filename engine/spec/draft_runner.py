"""The draft model of speculative decoding, executor side: its weights, its paged KV cache and
the model runner that executes its plans (engine/spec/draft_model.py builds them).

The draft cache has its own layers and heads but the target cache's block ids: it has as many
blocks, of the same size, and a request's draft KV lives in the blocks of the request's own
table (the target's). So the draft needs no allocator: what the target's block manager hands
out and takes back covers both caches, and the leak checks cover the draft too. Its dtype and
device are the target's. Without a fixed `num_blocks`, the pool is sized so that both caches
fit where the target's alone would have.

A drafting round is a few `StepPlan`s run back to back: no host sync between them (each reads
the tokens the one before sampled from the runner's `sampled_ids`, as a step of asynchronous
scheduling does), then one copy of every drafted id to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.attention import get_backend
from engine.builder import build_model, make_kv_cache, num_kv_blocks_that_fit
from engine.config import EngineConfig
from engine.kv_cache.cache_tensor import bytes_per_block
from engine.loader.source import open_model
from engine.model_runner import ModelRunner
from engine.models.config import ModelConfig
from engine.models.weights import load_weights
from engine.plan import StepPlan


def load_draft_model(config: EngineConfig, target: ModelConfig):
    """(config, model) of the draft, checked against the target before any weight loads.
    Load it before sizing the target's cache: its weights count against the room."""
    source = open_model(config.speculative.draft_model)
    if source.config.vocab_size != target.vocab_size:
        raise ValueError(f"speculative draft_model {config.speculative.draft_model!r} has "
                         f"vocab_size {source.config.vocab_size}, the target "
                         f"{target.vocab_size}: a draft must share the target's tokenizer")
    model = build_model(source.config, config.torch_dtype, config.device)
    load_weights(model, source.iter_lazy_weights())
    return source.config, model


def shared_num_blocks(config: EngineConfig, target: ModelConfig, draft: ModelConfig) -> int:
    """Blocks of each cache (the same ids in both): the configured count, or as many as fit
    when every block id costs a target block and a draft block."""
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    target_bytes, draft_bytes = (bytes_per_block(cfg, cache.block_size, config.torch_dtype,
                                                 kv_cache_dtype=cache.kv_cache_dtype)
                                 for cfg in (target, draft))
    fit = num_kv_blocks_that_fit(target, config)  # with the draft's weights already loaded
    return max(1, fit * target_bytes // (target_bytes + draft_bytes))


class DraftRunner:
    """The draft model, its KV cache and its model runner, on the target's device."""

    def __init__(self, config: EngineConfig, draft_config: ModelConfig, model,
                 num_blocks: int, max_model_len: int) -> None:
        """`max_model_len`: the target's (block tables of that length reach the draft)."""
        self.model_config = draft_config
        self.model = model
        # drafting stops for a request past the draft's own context
        self.max_model_len = min(max_model_len, draft_config.max_position_embeddings)
        # catch-up tokens per step (engine/spec/draft_model.py), at least 2 (config.py says why)
        self.max_catch_up_tokens = (config.speculative.max_catch_up_tokens
                                    or max(2, config.scheduler.max_num_batched_tokens))
        self.kv_cache = make_kv_cache(draft_config, config, num_blocks=num_blocks)
        self.runner = ModelRunner(model, self.kv_cache,
                                  get_backend(config.attention_backend, config.device),
                                  config.cache.block_size, draft_config.vocab_size,
                                  config.device, use_cuda_graphs=config.use_cuda_graphs,
                                  max_model_len=max_model_len,
                                  max_num_seqs=config.speculative.max_batch_size)
        # draft steps replay graphs: single-token steps, and catch-ups of up to k + 1 tokens
        # per sequence (accepted drafts + bonus) as rows, all captured now
        spec = config.speculative
        self.graph_rows = (spec.num_speculative_tokens + 1) * spec.max_batch_size
        if self.runner.decode_graphs is not None:
            self.runner.decode_graphs.capture_up_to(self.graph_rows)
        else:
            self.graph_rows = 0

    def run(self, plans: Sequence[StepPlan]) -> list[int]:
        """Run a drafting round's plans in order; every plan's sampled ids, flat, in order."""
        columns = []
        for plan in plans:
            out = self.runner.execute(plan)  # None: nothing sampled (catch-up only)
            if out is not None:
                columns.append(out.token_ids.clone())  # a graph's next replay overwrites them
        return torch.cat(columns).tolist() if columns else []  # the round's one host sync
