"""The n-gram (prompt lookup) proposer: drafts the tokens that followed the latest earlier
occurrence of the sequence's own suffix. No model, no device work: it pays off on outputs that
repeat their input (code edits, summaries, extraction), and drafts nothing elsewhere.

The search covers at most `search_window` recent tokens of each sequence (one vectorized
comparison per n-gram length), so its host cost per request is bounded whatever the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MAX_SPECULATIVE_TOKENS = 16
MAX_NGRAM = 16


@dataclass(frozen=True, slots=True)
class NgramConfig:
    num_speculative_tokens: int = 4  # k: tokens drafted per step at most
    max_ngram: int = 4  # longest suffix tried first
    min_ngram: int = 1  # shortest suffix accepted as a match
    search_window: int = 4096  # most recent tokens searched

    def __post_init__(self) -> None:
        if not 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], "
                             f"got {self.num_speculative_tokens}")
        if not 1 <= self.min_ngram <= self.max_ngram <= MAX_NGRAM:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram <= {MAX_NGRAM}, got "
                             f"min_ngram={self.min_ngram}, max_ngram={self.max_ngram}")
        if self.search_window < self.max_ngram + 1:
            raise ValueError(f"search_window must be > max_ngram, got {self.search_window}")


class NgramProposer:
    """Stateless: `propose` looks at a request's tokens (prompt + outputs) each step."""

    def __init__(self, config: NgramConfig) -> None:
        self.config = config

    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Up to k (and `max_tokens`) tokens that followed the latest earlier occurrence of the
        longest matching suffix n-gram, max_ngram down to min_ngram long; [] without a match."""
        cfg = self.config
        limit = cfg.num_speculative_tokens if max_tokens is None else min(
            cfg.num_speculative_tokens, max_tokens)
        if limit <= 0:
            return []
        tokens = np.asarray(token_ids[-cfg.search_window:], dtype=np.int64)
        for n in range(min(cfg.max_ngram, len(tokens) - 1), cfg.min_ngram - 1, -1):
            # windows that start early enough to have at least one token after them
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start:start + limit].tolist()
        return []

    # stateless and on the host: plain steps may draft without verifying (engine/spec/shadow.py)
    shadow_propose = propose

    def fill(self, chunks) -> None:
        """Nothing to fill: `propose` returned the tokens themselves."""
