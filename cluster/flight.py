"""Per-request state of the disaggregated backend: a `Flight` per client request, an `Attempt`
per (prefill, decode) pair it runs on.

A request that loses an instance (it died, was drained, or its KV transfer failed) moves: the
current attempt is abandoned (its live side aborted, so its blocks come back) and a new attempt
re-prefills prompt + the tokens already streamed on live instances. Each attempt has its own
worker-side request id, so a late delta of an abandoned attempt is never taken for the new one:

    attempt 0:  "<request_id>"       attempt n:  "<request_id>#<n>"

"#" cannot appear in a client's request id (router/validation.py), so the client id is the part
before it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cluster.pools import Worker
from router.backend import GenerationInput, Timing

ATTEMPT_SEPARATOR = "#"
ABORT_REASON = "aborted"  # an attempt's failure result when the Abort RPC ended the request


def worker_request_id(request_id: str, attempt: int) -> str:
    return request_id if attempt == 0 else f"{request_id}{ATTEMPT_SEPARATOR}{attempt}"


def client_request_id(worker_id: str) -> str:
    return worker_id.partition(ATTEMPT_SEPARATOR)[0]


@dataclass(slots=True)
class Attempt:
    """One try of a request on one (prefill, decode) pair."""

    worker_id: str  # the request id the workers know
    queue: asyncio.Queue  # this attempt's deltas (and markers), from the decode pump
    failure: asyncio.Future  # set to a reason when an instance it depends on is lost
    prefill: Worker | None = None
    decode: Worker | None = None
    reserving: tuple[Worker, object] | None = None  # (decode, ObjectRef) of a pending reserve
    prefilled: bool = False  # the prefill answered: only the decode instance matters now
    lost_role: str = ""  # what ended it: an InstanceLost cause
    released: bool = False  # its workers were told to abort (done once)

    def depends_on(self, worker: Worker) -> bool:
        return (self.decode is worker or (self.prefill is worker and not self.prefilled)
                or (self.reserving is not None and self.reserving[0] is worker))


@dataclass(slots=True)
class Flight:
    """One client request from admission until its stream ends."""

    inp: GenerationInput
    attempt: Attempt
    streamed: list[int] = field(default_factory=list)  # token ids handed to the client so far
    migrations: int = 0
    move_deadline_s: float = 0.0  # monotonic time the current move gives up
    timing: Timing | None = None  # from the first token on
    finished: bool = False
    aborted: bool = False  # by the Abort RPC; the workers are aborted when the stream ends

    def new_attempt(self) -> Attempt:
        """Start the next attempt (after a migration, or a retry of a refused one); the
        caller has released the previous one."""
        loop = asyncio.get_running_loop()
        self.attempt = Attempt(worker_request_id(self.inp.request_id, self.migrations),
                               asyncio.Queue(), loop.create_future())
        return self.attempt


def new_flight(inp: GenerationInput) -> Flight:
    loop = asyncio.get_running_loop()
    return Flight(inp, Attempt(inp.request_id, asyncio.Queue(), loop.create_future()))


class InstanceLost(Exception):
    """The current attempt lost an instance it needs; the request may move."""

    def __init__(self, cause: str, message: str) -> None:
        super().__init__(message)
        self.cause = cause  # "prefill", "decode", "transfer" or "drain"


class InstanceDown:
    """Queue marker: an instance the attempt needs is gone (the failure future says why)."""


class Aborted(Exception):
    """The Abort RPC ended this request before its first token."""
