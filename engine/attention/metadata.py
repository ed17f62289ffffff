"""What every attention layer needs to know about one step's batch, built once per step.

Tokens are packed: the first `num_decode_tokens` tokens are decodes (one per sequence), the rest
are prefill chunks, sequence after sequence. For each group, `block_tables` map sequence-local
block indices to physical blocks, `context_lens` count the tokens with KV in the cache after this
step's writes (cached + new), and `query_start` delimits each sequence's new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class SeqGroup:
    """A group of sequences attended by one kernel launch (all decodes, or all prefills)."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    context_lens: torch.Tensor  # [B] int64 (as the graphs' packed inputs), cached + new tokens
    query_start: torch.Tensor  # [B + 1] int32, offsets of each sequence's new tokens
    max_query_len: int
    max_context_len: int
    cache: dict = field(default_factory=dict)  # backend-specific tensors derived once per step

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) per token
    num_decode_tokens: int
    decode: SeqGroup | None
    prefill: SeqGroup | None
