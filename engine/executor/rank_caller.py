"""Rank 0's side of the rank services (rank_calls.py): calls with replies, events, lost ranks.

A call goes to every other rank and waits for all their replies, within a deadline; a rank that
is gone, or goes while the call waits, fails it at once. Events and lost ranks go to handlers
that the instance's worker installs (they run on the reader thread: keep them short).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.executor.plan_channel import PlanSender
from engine.executor.rank_calls import RankCall, RankCallError, decode_message

log = logging.getLogger(__name__)
EventHandler = Callable[[int, str, Any], None]  # (rank, name, value)
LostHandler = Callable[[int], None]  # rank


@dataclass(slots=True)
class _Waiting:
    """One call's replies so far."""

    ranks: set[int]
    values: dict[int, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


class RankCaller:
    """Calls the services of ranks 1..world_size-1 over the plan sockets."""

    def __init__(self, sender: PlanSender, world_size: int) -> None:
        self._sender = sender
        self._ranks = set(range(1, world_size))
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, _Waiting] = {}
        self.lost: set[int] = set()
        self._on_event: EventHandler | None = None
        self._on_lost: list[LostHandler] = []
        sender.start_reader(self._message, self._lost)

    def set_event_handler(self, handler: EventHandler) -> None:
        self._on_event = handler

    def add_lost_handler(self, handler: LostHandler) -> None:
        """`handler(rank)` when a rank's process is gone (now, if one already is)."""
        with self._lock:
            self._on_lost.append(handler)
            lost = sorted(self.lost)
        for rank in lost:
            handler(rank)

    def call(self, name: str, args: tuple = (), timeout_s: float = 60.0,
             inline: bool = False) -> dict[int, Any]:
        """Run `name(*args)` on every other rank's service; {rank: result}. RankCallError if
        one raised, did not answer within `timeout_s`, or is gone."""
        call_id = next(self._ids)
        waiting = _Waiting(set(self._ranks))
        with self._lock:
            if self.lost:
                raise RankCallError(f"rank(s) {sorted(self.lost)} of this instance are gone")
            self._waiting[call_id] = waiting
        try:
            self._send(RankCall(call_id, name, args, inline))
            if not waiting.done.wait(timeout_s):
                raise RankCallError(f"rank(s) {sorted(waiting.ranks)} did not answer {name!r} "
                                    f"within {timeout_s:g} s")
        finally:
            with self._lock:
                self._waiting.pop(call_id, None)
        if waiting.errors:
            raise RankCallError(f"{name!r} failed: " + "; ".join(waiting.errors))
        return waiting.values

    def post(self, name: str, args: tuple = (), inline: bool = False) -> None:
        """Run `name(*args)` on every other rank's service; no reply (errors come as events)."""
        self._send(RankCall(0, name, args, inline))

    def _send(self, call: RankCall) -> None:
        try:
            self._sender.send(call)
        except OSError as exc:
            raise RankCallError(f"a rank of this instance is gone: {exc}") from None

    def _message(self, payload: bytes) -> None:
        message = decode_message(payload)
        rank = int(message["rank"])
        if message["kind"] == "event":
            if self._on_event is not None:
                self._on_event(rank, message["name"], message["value"])
            return
        with self._lock:
            waiting = self._waiting.get(int(message["call"]))
            if waiting is None:  # timed out meanwhile
                return
            if message["error"]:
                waiting.errors.append(f"rank {rank}: {message['error']}")
            waiting.values[rank] = message["value"]
            waiting.ranks.discard(rank)
            if not waiting.ranks:
                waiting.done.set()

    def _lost(self, rank: int) -> None:
        log.error("rank %d of this instance is gone (its plan socket closed)", rank)
        with self._lock:
            self.lost.add(rank)
            handlers = list(self._on_lost)
            for waiting in self._waiting.values():
                waiting.errors.append(f"rank {rank} is gone")
                waiting.done.set()
        for handler in handlers:
            handler(rank)

