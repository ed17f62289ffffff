"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import dispatch
from engine.parallel import ParallelContext


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across tensor-parallel ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.parallel = parallel
        self.tp_size = parallel.tp_size
        self.vocab_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = parallel.tp_rank * self.vocab_per_rank
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(self.vocab_per_rank, hidden_size), requires_grad=False)

    def load_full(self, param: nn.Parameter, loaded) -> None:
        """Keep this rank's rows; the padding rows past the vocabulary stay zero."""
        rows = max(0, min(self.vocab_per_rank, self.vocab_size - self.vocab_start))
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight)
        return self.parallel.all_reduce(out * in_range.unsqueeze(-1))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; shares its weight with the embedding when tied.

    The logits are gathered to the full vocabulary on every tensor rank, so sampling runs the
    same way (same ids) on each of them.
    """

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.parallel.all_gather_last_dim(dispatch.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
