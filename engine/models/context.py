"""The per-step inputs every layer shares, passed explicitly down the model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata


@dataclass(slots=True)
class ForwardContext:
    kv_cache: torch.Tensor  # [stage layers, num_blocks, 2, block_size, this rank's Hkv, D]
    attn_meta: AttentionMetadata
    backend: object  # an attention backend: forward(q, k, v, kv_layer, meta, scale)
    # Called after layer i (stage-local index) has written its KV, e.g. to stream it to a
    # decode instance.
    on_layer_done: Callable[[int], None] | None = None
