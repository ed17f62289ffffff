"""Work a multi-rank instance does on every rank besides running plans: the rank services.

The engine runs the same plan on every rank; some features also need per-rank state that is not
a step's, such as a KV-transfer link from this rank to the same rank of a peer instance. A
feature provides a *rank service*: a class built once in each rank process (ranks 1..N-1) from a
`RankContext`. Rank 0 reaches them through the executor (`RankGroupExecutor.call_ranks` /
`post_ranks`), over the same authenticated socket that carries plans, so a call posted before a
plan is handled before that plan. Services answer calls and may emit events at any time (from
any thread); both travel back to rank 0 as JSON, never pickled.

A call is `inline` when it must take effect in order with the plans (it runs on the rank's main
loop, so it must be quick: e.g. begin this step's KV sends); other calls run on a thread of
their own (e.g. build a channel, which blocks until the peer answers), so plans keep flowing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from engine.executor.base import LayerListener


@dataclass(frozen=True, slots=True)
class RankCall:
    """A call from rank 0 to the service of every other rank (pickled like a plan)."""

    call_id: int  # 0: no reply wanted (a post); its errors come back as events
    name: str  # the service method
    args: tuple = ()
    inline: bool = False  # run on the rank's main loop, in order with the plans


class RankCallError(RuntimeError):
    """A rank's service raised, did not answer in time, or the rank is gone."""


@dataclass(frozen=True, slots=True)
class RankContext:
    """What a rank service gets when its rank process has built itself."""

    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    kv_cache: Any  # torch.Tensor: this rank's KV cache (its stage's layers, its KV heads)
    model_name: str
    layout: str  # the instance's parallel layout, e.g. "tp=2 pp=1"
    emit: Callable[[str, Any], None]  # send an event (name, JSON-able value) to rank 0


class RankService(Protocol):
    """Per-rank state of one feature, in ranks 1..N-1 (rank 0 keeps its own in-process)."""

    def call(self, name: str, args: tuple) -> Any:
        """Run one call; the JSON-able result goes back to rank 0."""
        ...

    def layer_listener(self) -> LayerListener | None:
        """The listener for the plan about to run (set up by an inline call before it)."""
        ...

    def after_plan(self) -> None:
        """The plan has run on this rank."""
        ...

    def close(self) -> None:
        ...


ServiceFactory = Callable[[RankContext], RankService]


def encode_reply(call_id: int, rank: int, value: Any = None, error: str = "") -> bytes:
    return json.dumps({"kind": "reply", "call": call_id, "rank": rank, "value": value,
                       "error": error}).encode()


def encode_event(rank: int, name: str, value: Any) -> bytes:
    return json.dumps({"kind": "event", "rank": rank, "name": name, "value": value}).encode()


def decode_message(payload: bytes) -> dict:
    """A reply or event from a rank; ValueError if it is neither."""
    message = json.loads(payload)
    if not isinstance(message, dict) or message.get("kind") not in ("reply", "event"):
        raise ValueError(f"not a rank message: {payload[:80]!r}")
    return message


def layout_name(tensor_parallel_size: int, pipeline_parallel_size: int) -> str:
    """How a parallel layout is written in messages and errors, e.g. "tp=2 pp=1"."""
    return f"tp={tensor_parallel_size} pp={pipeline_parallel_size}"
