"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import dispatch
from engine.parallel import all_gather_last_dim, all_reduce, tp_state


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across tensor-parallel ranks."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        tp = tp_state()
        self.tp_size = tp.world_size
        self.vocab_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = tp.rank * self.vocab_per_rank
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(self.vocab_per_rank, hidden_size), requires_grad=False)

    def load_full(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        rows = min(self.vocab_per_rank, self.vocab_size - self.vocab_start)
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight)
        return all_reduce(out * in_range.unsqueeze(-1))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; shares its weight with the embedding when tied."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = all_gather_last_dim(dispatch.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]
