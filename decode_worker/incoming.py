"""A decode instance's reserved requests while their KV and first token arrive (the decode
worker's `incoming`, engine thread only)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.request import Request
from protos.pdserve.v1 import worker_pb2


class Arrival(enum.Flag):
    NONE = 0
    KV = enum.auto()
    FIRST_TOKEN = enum.auto()
    BOTH = KV | FIRST_TOKEN


@dataclass(eq=False)
class Incoming:
    """A reserved request waiting for its KV and its first token."""

    request: Request
    block_ids: list[int]  # the blocks a transfer fills: the table after the cached prefix
    reserved_at_s: float
    arrived: Arrival = Arrival.NONE
    first: worker_pb2.TokenDelta | None = None
    transfer_s: float = 0.0
    transfer_begun: bool = False  # a descriptor for it has arrived
    begun_at_s: float = 0.0  # when; its KV must land within LANDING_TIMEOUTS x transfer timeout
    aborted: bool = False
