"""How rank 0 of an instance hands every step's plan to the other ranks.

Rank 0 (the process of the engine core) listens on a socket; each other rank connects once at
start-up, authenticated by a per-instance secret (an HMAC challenge: a stranger that reaches the
port is refused). A plan is pickled once and its bytes written to every peer; a peer blocks in
`recv` until the next plan and sees end of file the moment rank 0's process dies, so an idle
rank needs no timeout and no heartbeat. The alternative, a broadcast over the instance's Gloo
group, needs a deadline on every wait, and an idle instance would trip it
(benchmarks/plan_broadcast.py measures both).

The same sockets carry rank-service calls (rank_calls.py) down, and their replies and events
back up as JSON (rank 0 never unpickles what a peer sends). Rank 0 reads them on one reader
thread, which also sees a peer's end of file the moment that rank's process dies: `on_lost`
names the rank at once, without waiting for the next collective to time out.
"""

from __future__ import annotations

import json
import logging
import pickle
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection, Listener, wait

from engine.executor.rank_calls import RankCall
from engine.plan import StepPlan

log = logging.getLogger(__name__)

_STOP = b"stop"  # sent instead of a plan: the rank exits


class PlanSender:
    """Rank 0's end: accepts the peers, then writes each plan to all of them."""

    def __init__(self, host: str, authkey: bytes) -> None:
        self._listener = Listener((host, 0), authkey=authkey)
        self.address: tuple[str, int] = self._listener.address
        self._peers: list[Connection] = []
        self._lock = threading.Lock()  # plans (engine thread) and calls (any thread) interleave
        self._reader: threading.Thread | None = None
        self._closing = False

    def accept(self, num_peers: int, timeout_s: float) -> None:
        """Wait for `num_peers` ranks to connect; TimeoutError after `timeout_s`."""
        errors: list[BaseException] = []

        by_rank: dict[int, Connection] = {}

        def accept_all() -> None:
            try:
                while len(by_rank) < num_peers:
                    peer = self._listener.accept()
                    if not peer.poll(timeout_s):  # its first message names its rank
                        raise TimeoutError("a rank connected but never said which it is")
                    rank = int(json.loads(peer.recv_bytes())["rank"])
                    if not 1 <= rank <= num_peers or rank in by_rank:
                        raise ValueError(f"unexpected rank {rank} connected")
                    by_rank[rank] = peer
            except BaseException as exc:  # closed listener or a failed handshake
                errors.append(exc)

        thread = threading.Thread(target=accept_all, name="plan-accept", daemon=True)
        thread.start()
        thread.join(timeout_s)
        self._peers = [by_rank[rank] for rank in sorted(by_rank)]  # peer i is rank i + 1
        if len(self._peers) < num_peers:
            self._listener.close()  # ends the accept thread
            detail = f": {errors[0]}" if errors else ""
            raise TimeoutError(f"{len(self._peers)} of {num_peers} ranks connected within "
                               f"{timeout_s:g} s{detail}")

    def send(self, message: StepPlan | RankCall) -> int:
        """Write one plan or call to every peer; returns its size in bytes."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            for peer in self._peers:
                peer.send_bytes(payload)  # BrokenPipeError / ConnectionError if that rank died
        return len(payload)

    def start_reader(self, on_message: Callable[[bytes], None],
                     on_lost: Callable[[int], None]) -> None:
        """Read what the peers send back on a thread of its own: each message to `on_message`;
        a peer's end of file (its process died) to `on_lost(rank)`, once, unless we are
        closing (then the ranks exit because we told them to)."""
        ranks = {peer: index + 1 for index, peer in enumerate(self._peers)}
        self._reader = threading.Thread(target=self._read, args=(ranks, on_message, on_lost),
                                        name="rank-replies", daemon=True)
        self._reader.start()

    def _read(self, ranks: dict[Connection, int], on_message, on_lost) -> None:
        live = dict(ranks)
        while live:
            try:
                ready = wait(list(live), timeout=1.0)
            except (OSError, ValueError):  # closed under us
                return
            for peer in ready:
                try:
                    payload = peer.recv_bytes()
                except (EOFError, OSError):
                    rank = live.pop(peer)
                    if not self._closing:
                        on_lost(rank)
                    continue
                try:
                    on_message(payload)
                except Exception:  # noqa: BLE001 - a bad message must not stop the reader
                    log.exception("cannot handle a message from rank %d", live[peer])

    def close(self, timeout_s: float = 5.0) -> None:
        """Tell every rank to exit (best effort), let the reader see them go, close."""
        self._closing = True
        with self._lock:
            for peer in self._peers:
                try:
                    peer.send_bytes(_STOP)
                except OSError:
                    pass
        if self._reader is not None:
            self._reader.join(timeout_s)
        for peer in self._peers:
            peer.close()
        self._peers.clear()
        self._listener.close()


class PlanReceiver:
    """Another rank's end: one connection to rank 0."""

    def __init__(self, address: tuple[str, int], authkey: bytes, timeout_s: float,
                 rank: int) -> None:
        self._lock = threading.Lock()  # replies and events come from several threads
        deadline = time.monotonic() + timeout_s
        while True:  # rank 0 may not listen yet only if it was slow to start; retry briefly
            try:
                self._conn = Client(address, authkey=authkey)
                self._conn.send_bytes(json.dumps({"rank": rank}).encode())  # who we are
                return
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def recv(self) -> StepPlan | RankCall | None:
        """The next plan or call; None when rank 0 says stop. EOFError when rank 0 is gone."""
        payload = self._conn.recv_bytes()
        return None if payload == _STOP else pickle.loads(payload)

    def send_back(self, payload: bytes) -> None:
        """A reply or event (JSON bytes) to rank 0; dropped if rank 0 is gone."""
        with self._lock:
            try:
                self._conn.send_bytes(payload)
            except OSError:
                log.debug("rank 0 is gone; dropping a message")

    def close(self) -> None:
        self._conn.close()
