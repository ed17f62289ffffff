"""What `SpecDecoding` asks of a proposer: drafts for the requests that decode next, in two
calls around the scheduler.

1. `propose(token_ids, max_tokens)`, before scheduling, per request (its prompt + outputs, all
   on the host): its drafts — the tokens themselves for a proposer without device work
   (n-gram), or as many `PENDING` placeholders as it will draft (a draft model: the count
   only). The scheduler then fits the drafts into the step's token budget and free blocks and
   allocates the k + 1 verification slots of each request (engine/scheduler.py).
2. `fill(chunks)`, after scheduling and before the step's plan is built, only for the
   scheduled chunks that still carry placeholders: replace them with real tokens. Its device
   work writes KV only into slots the chunks' requests own by then: a request drafting k tokens
   after position n - 1 owns positions up to n + k - 1; a draft model writes up to n + k - 2.

Drafts are point masses (a token each, no distribution): the verifier keeps a draft while it
equals the target sampler's own draw at that position (engine/spec/rejection.py), so what a
proposer drafts changes the speed, never the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from engine.scheduler import ScheduledChunk

PENDING = -2  # a draft slot whose token `fill` supplies (never a vocabulary id)


class Proposer(Protocol):
    """A speculative-decoding proposer (engine/spec/ngram.py, engine/spec/draft_model.py)."""

    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """Up to k (and `max_tokens`) drafts for one sequence, or `PENDING` placeholders."""
        ...

    def fill(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Replace the `PENDING` drafts of scheduled chunks with tokens (in place)."""
        ...


def has_pending(chunk: ScheduledChunk) -> bool:
    """Whether a scheduled chunk's drafts are placeholders still to fill."""
    return bool(chunk.spec_token_ids) and chunk.spec_token_ids[0] == PENDING
