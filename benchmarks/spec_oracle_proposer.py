"""A benchmark-only speculative-decoding proposer that replays known continuations at a
controlled acceptance rate (benchmarks/spec_oracle.py).

Random weights make every real proposer useless (an n-gram lookup or a draft model agrees with
the target about as often as chance), so a speed-up measured on them shows only the overhead.
`OracleProposer` knows each prompt's greedy continuation, recorded by a plain run of the same
engine configuration beforehand, and drafts from it: for a sequence that is prompt +
reference[:n] it drafts reference[n:n + k], each position kept right with probability `p` and
otherwise replaced by a token the target will not pick ((reference + 1) % vocab). Whether a
position is right is decided by a seeded hash of (prompt index, position), not by call order,
so runs are reproducible and a position rejected once is never re-drafted differently. The
verifier keeps the longest right prefix, so this is the i.i.d. acceptance model in which a
verification yields (1 - p^(k+1)) / (1 - p) tokens on average (`expected_tokens`).

A sequence is matched to its prompt by its token ids (the engine's request ids are not ours).
Once its generated tokens differ from the reference (on a GPU, verification rows need not be
bitwise equal to the plain decode rows that made the reference), it gets no drafts for the rest
of the run, and it is counted in `diverged`. `CountingPayoff` is the engine's own drafting
controller, counting its per-step decisions for the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.builder import init_random_weights
from engine.spec.decoding import Payoff

if TYPE_CHECKING:
    from engine.scheduler import ScheduledChunk

_MASK = (1 << 64) - 1
KEY_TOKENS = 16  # prompt tokens a lookup hashes (prompts must differ within them)


def keep_fraction(seed: int, prompt_index: int, position: int) -> float:
    """A uniform number in [0, 1) from (seed, prompt index, position): splitmix64's finalizer
    over a mix of the three."""
    x = (seed * 0x9E3779B97F4A7C15 + prompt_index * 0xD1B54A32D192ED03
         + position * 0x8CB92BA72F3D8DD7 + 1) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) / 2.0 ** 64


def set_chain_weights(model: torch.nn.Module, seed: int = 0, branch_scale: float = 0.01) -> None:
    """Random weights (in place) whose greedy output is a chain x -> succ(x) with a margin no
    rounding can flip: embeddings of std 1, attention and MLP outputs scaled down by
    `branch_scale` (the last token's embedding dominates the final hidden state), and the LM
    head the embeddings permuted (a random permutation: succ). Every kernel still runs on the
    same shapes. Plain random weights leave near-ties that bf16 verification rows flip against
    plain decode rows, so their sequences leave the reference within tens of tokens."""
    init_random_weights(model, seed=seed)
    emb = model.embed_tokens.weight
    gen = torch.Generator(device=emb.device).manual_seed(seed + 1)
    emb.data.normal_(0.0, 1.0, generator=gen)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            p.data.mul_(branch_scale)
    perm = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(seed + 2))
    model.lm_head.weight.data.copy_(emb.data[perm.to(emb.device)])


def expected_tokens(p: float, k: int) -> float:
    """Tokens one verification of k drafts yields when each is right with probability p."""
    return float(k + 1) if p >= 1.0 else (1 - p ** (k + 1)) / (1 - p)


def implied_acceptance(tokens_per_verification: float, k: int) -> float:
    """The per-position p at which `expected_tokens(p, k)` is this (bisection): the measured
    counterpart of the p a row was run at (short drafts at a sequence's end bias it low)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_tokens(mid, k) < tokens_per_verification else (lo, mid)
    return (lo + hi) / 2


@dataclass(slots=True)
class _Entry:
    index: int
    prompt: list[int]
    reference: list[int]
    drafts: list[int]  # per output position: the reference token, or a wrong one


@dataclass(slots=True)
class OracleCounters:
    """Since the last `load`: proposals made, drafts returned, sequences that diverged."""

    num_proposals: int = 0
    num_draft_tokens: int = 0
    num_short_proposals: int = 0  # fewer than k drafts (the end of the reference or max_tokens)
    num_unknown: int = 0  # sequences matching no loaded prompt (drafted nothing)
    diverged: dict[int, int] = field(default_factory=dict)  # prompt index -> first bad position


class CountingPayoff(Payoff):
    """The engine's `Payoff`, counting its decisions per batch size (running requests)."""

    def __init__(self) -> None:
        super().__init__()
        self.decisions: dict[int, list[bool]] = {}  # batch -> per step: drafting?

    def wants_drafts(self, batch: int, from_shadow: bool = False) -> bool:
        drafts = super().wants_drafts(batch, from_shadow)
        self.decisions.setdefault(batch, []).append(drafts)
        return drafts

    def drafting_share(self, batch: int) -> tuple[int, float]:
        """(steps decided at `batch`, the share that drafted in their second half: past the
        prompts' prefill, which counts as drafting steps while nothing decodes yet)."""
        steps = self.decisions.get(batch, [])
        late = steps[len(steps) // 2:]
        return len(steps), sum(late) / len(late) if late else 0.0


class OracleProposer:
    """Drafts the loaded references (the `Proposer` protocol of engine/spec/proposer.py)."""

    def __init__(self, num_speculative_tokens: int, acceptance: float, vocab_size: int,
                 seed: int = 0) -> None:
        if not 1 <= num_speculative_tokens <= 7:
            raise ValueError(f"num_speculative_tokens must be in [1, 7], "
                             f"got {num_speculative_tokens}")
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance must be in [0, 1], got {acceptance}")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.k = num_speculative_tokens
        self.acceptance = acceptance
        self.vocab_size = vocab_size
        self.seed = seed
        self.counters = OracleCounters()
        self._entries: dict[tuple[int, ...], _Entry] = {}

    def load(self, prompts: Sequence[Sequence[int]],
             references: Sequence[Sequence[int]]) -> None:
        """The prompts of the next run and their reference continuations; resets counters."""
        if len(prompts) != len(references):
            raise ValueError(f"got {len(prompts)} prompts but {len(references)} references")
        self._entries = {}
        for index, (prompt, reference) in enumerate(zip(prompts, references)):
            key = tuple(prompt[:KEY_TOKENS])
            if len(prompt) < KEY_TOKENS or key in self._entries:
                raise ValueError(f"prompts: prompt {index} must have >= {KEY_TOKENS} tokens "
                                 f"and differ from the others within them")
            drafts = [token if keep_fraction(self.seed, index, pos) < self.acceptance
                      else (token + 1) % self.vocab_size for pos, token in enumerate(reference)]
            self._entries[key] = _Entry(index, list(prompt), list(reference), drafts)
        self.counters = OracleCounters()

    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        entry, n, bad = self._match(token_ids)
        if entry is None:
            self.counters.num_unknown += 1
            return []
        if entry.index in self.counters.diverged:
            return []
        if bad is not None:
            self.counters.diverged[entry.index] = bad
            return []
        drafts = self._drafts(entry, n, max_tokens)
        if drafts:
            self.counters.num_proposals += 1
            self.counters.num_draft_tokens += len(drafts)
            self.counters.num_short_proposals += len(drafts) < self.k
        return drafts

    def shadow_propose(self, token_ids: Sequence[int], max_tokens: int | None = None
                       ) -> list[int]:
        """What `propose` would draft, counting nothing and marking no divergence (the
        engine's shadow drafts while drafting pauses: engine/spec/shadow.py)."""
        entry, n, bad = self._match(token_ids)
        if entry is None or bad is not None or entry.index in self.counters.diverged:
            return []
        return self._drafts(entry, n, max_tokens)

    def _match(self, token_ids: Sequence[int]) -> tuple[_Entry | None, int, int | None]:
        """(the loaded entry whose prompt `token_ids` starts with, or None; how many tokens
        follow the prompt; the first of them that differs from the reference, or None)."""
        token_ids = token_ids if isinstance(token_ids, list) else list(token_ids)
        entry = self._entries.get(tuple(token_ids[:KEY_TOKENS]))
        if entry is None or token_ids[:len(entry.prompt)] != entry.prompt:
            return None, 0, None
        generated = token_ids[len(entry.prompt):]
        n = len(generated)
        if generated == entry.reference[:n]:
            return entry, n, None
        bad = next((i for i, (a, b) in enumerate(zip(generated, entry.reference)) if a != b),
                   min(n, len(entry.reference)))
        return entry, n, bad

    def _drafts(self, entry: _Entry, n: int, max_tokens: int | None) -> list[int]:
        count = min(self.k, len(entry.reference) - n,
                    self.k if max_tokens is None else max_tokens)
        return entry.drafts[n:n + count] if count > 0 else []

    def fill(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Nothing to fill: the drafts are tokens already."""
