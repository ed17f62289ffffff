"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import dispatch
from engine.parallel import ParallelContext


def vocab_slice(vocab_size: int, tp_rank: int, tp_size: int) -> tuple[int, int]:
    """(first token id, number of columns) of a tensor rank's vocab slice: ceil(V / tp) each, the
    last slices padded past the vocabulary (a slice may be all padding when tp is large)."""
    per_rank = -(-vocab_size // tp_size)
    return tp_rank * per_rank, per_rank


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split across tensor-parallel ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext) -> None:
        super().__init__()
        self.parallel = parallel
        self.tp_size = parallel.tp_size
        self.vocab_start, self.vocab_per_rank = vocab_slice(vocab_size, parallel.tp_rank,
                                                            parallel.tp_size)
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.zeros(self.vocab_per_rank, hidden_size), requires_grad=False)

    def load_full(self, param: nn.Parameter, loaded) -> None:
        """Keep this rank's rows; the padding rows past the vocabulary stay zero."""
        rows = self._num_real_rows()
        param.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def _num_real_rows(self) -> int:
        return max(0, min(self.vocab_per_rank, self.vocab_size - self.vocab_start))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        in_range = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight)
        return self.parallel.all_reduce(out * in_range.unsqueeze(-1))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to vocabulary logits; shares its weight with the embedding when tied.

    With `gather_logits` (the default) the logits are gathered to the full vocabulary on every
    tensor rank, so sampling runs the same way (same ids) on each of them. Without it each rank
    keeps its slice, [rows, vocab_per_rank], columns past the vocabulary at -inf: the runner of
    a tensor-parallel stage samples the slices (engine/tp_sampler.py) and gathers only when a
    step's options need the whole row. At tp 1 the slice is the whole vocabulary either way.
    """

    def __init__(self, vocab_size: int, hidden_size: int, parallel: ParallelContext) -> None:
        super().__init__(vocab_size, hidden_size, parallel)
        self.gather_logits = True  # False: compute_logits returns this rank's slice
        self.num_padding = self.vocab_per_rank - self._num_real_rows()  # columns past the vocab

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = dispatch.linear(hidden, self.weight)
        if self.gather_logits or self.tp_size == 1:
            return self.parallel.all_gather_last_dim(logits)[..., : self.vocab_size]
        if self.num_padding:
            logits[..., self.vocab_per_rank - self.num_padding:] = -torch.inf
        return logits
