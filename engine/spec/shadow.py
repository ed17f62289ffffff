"""Shadow drafts: what drafting would have kept, measured while it pauses, at no device cost.

While `Payoff` has plain decoding winning, a probe (a real verification step) is the only way
it learns that drafting would now pay, and at acceptance 0 those probes are pure loss. Where
the proposer drafts on the host (`shadow_propose`: n-gram lookup; not a draft model, whose
drafts cost a forward pass), every `every`-th plain step drafts for the running requests without
scheduling anything, and later scores each draft against the tokens plain decoding produced
at those positions. Verification keeps a draft exactly while it equals the target's own draw
at its position (engine/spec/rejection.py), and that draw is the token plain decoding samples
there (the sampler's noise is a function of the request's seed and the position), so the
matched prefix is what a verification would have kept. `SpecDecoding` hands the counts to
`Payoff.record_acceptance(..., shadow=True)`.

One host pass over the running requests every `every` plain steps; a draft waits until its
request has tokens at all its positions (or is dropped with the request).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.request import Request

SHADOW_EVERY = 8  # plain steps between two shadow passes


def matched_prefix(draft: Sequence[int], actual: Sequence[int]) -> int:
    """How many leading drafts equal the tokens produced at their positions."""
    n = 0
    for d, a in zip(draft, actual):
        if d != a:
            break
        n += 1
    return n


class ShadowDrafts:
    """Drafts made at plain steps, keyed by request, until their positions are decoded."""

    def __init__(self, room: Callable[[Request], int], every: int = SHADOW_EVERY) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._room = room
        self.every = every
        self._steps = 0
        self._pending: dict[str, tuple[int, list[int]]] = {}  # request id -> (position, drafts)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def step(self, running: Sequence[Request], propose: Callable[[list[int], int], list[int]],
             eager: bool = False) -> tuple[int, int]:
        """Once per plain step: (drafted, accepted) of the drafts scored at this step (0, 0
        between passes); `propose(tokens, max_tokens)` drafts without side effects. Drafts of
        requests no longer running are dropped. `eager`: pass at this step whatever the
        cadence (a first score is awaited: `Payoff.needs_shadow`)."""
        self._steps += 1
        if self._steps % self.every and not eager:
            return 0, 0
        pending: dict[str, tuple[int, list[int]]] = {}
        drafted = accepted = 0
        for request in running:
            entry = self._pending.get(request.request_id)
            if entry is not None and request.num_known_tokens < entry[0] + len(entry[1]):
                pending[request.request_id] = entry  # not all decoded yet: no token copy
                continue
            tokens = request.all_token_ids
            if entry is not None:
                position, draft = entry
                drafted += len(draft)
                accepted += matched_prefix(draft, tokens[position:position + len(draft)])
            room = self._room(request)
            if request.params.speculative and room > 0:
                draft = propose(tokens, room)
                if draft:
                    pending[request.request_id] = (len(tokens), draft)
        self._pending = pending
        return drafted, accepted
