"""Checks a request must pass before an engine core accepts it (clear ValueErrors)."""

from __future__ import annotations

from engine.kv_cache.block_table import num_blocks_for
from engine.output_processor import stop_token_ids
from engine.sampling_params import SamplingParams


def check_prompt(prompt: list[int], params: SamplingParams, max_model_len: int,
                 vocab_size: int, block_size: int, num_blocks: int) -> None:
    if not prompt:
        raise ValueError("prompt is empty: it must contain at least one token")
    if len(prompt) >= max_model_len:
        raise ValueError(f"prompt is {len(prompt)} tokens; the model's context length is "
                         f"{max_model_len}, leaving no room to generate")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), "
                         f"got {min(prompt)}..{max(prompt)}")
    longest = min(len(prompt) + params.max_tokens, max_model_len)
    needed = num_blocks_for(longest, block_size)
    if needed > num_blocks:
        raise ValueError(f"request needs up to {needed} KV blocks but the pool has only "
                         f"{num_blocks}; lower max_tokens or grow the cache")


def check_resumed_outputs(prompt: list[int], outputs: list[int], params: SamplingParams,
                          max_model_len: int, vocab_size: int, eos_token_ids) -> None:
    """Resumed outputs (a migrated request's) must leave the request unfinished (stop
    strings: `EngineCore.track` checks)."""
    if not outputs:
        return
    if min(outputs) < 0 or max(outputs) >= vocab_size:
        raise ValueError(f"output token ids must be in [0, {vocab_size}), "
                         f"got {min(outputs)}..{max(outputs)}")
    if len(prompt) + len(outputs) >= max_model_len:
        raise ValueError(f"prompt ({len(prompt)}) + output ({len(outputs)}) tokens reach the "
                         f"model's context length {max_model_len}: no room to generate")
    if len(outputs) >= params.max_tokens:
        raise ValueError(f"{len(outputs)} output tokens already reach max_tokens "
                         f"{params.max_tokens}: the request had already finished")
    stops = stop_token_ids(params, eos_token_ids)
    ended = [i for i, token_id in enumerate(outputs) if token_id in stops]
    if ended:
        raise ValueError(f"output_token_ids[{ended[0]}] = {outputs[ended[0]]} is a stop "
                         "token: the request had already finished")
