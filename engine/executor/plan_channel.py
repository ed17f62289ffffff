"""How rank 0 of an instance hands every step's plan to the other ranks.

Rank 0 (the process of the engine core) listens on a socket; each other rank connects once at
start-up, authenticated by a per-instance secret (an HMAC challenge: a stranger that reaches the
port is refused, and rank 0 never unpickles anything a peer sends). A plan is pickled once and
its bytes written to every peer; a peer blocks in `recv` until the next plan and sees end of
file the moment rank 0's process dies, so an idle rank needs no timeout and no heartbeat. The
alternative, a broadcast over the instance's Gloo group, needs a deadline on every wait, and an
idle instance would trip it (benchmarks/plan_broadcast.py measures both).
"""

from __future__ import annotations

import pickle
import threading
import time
from multiprocessing.connection import Client, Connection, Listener

from engine.plan import StepPlan

_STOP = b"stop"  # sent instead of a plan: the rank exits


class PlanSender:
    """Rank 0's end: accepts the peers, then writes each plan to all of them."""

    def __init__(self, host: str, authkey: bytes) -> None:
        self._listener = Listener((host, 0), authkey=authkey)
        self.address: tuple[str, int] = self._listener.address
        self._peers: list[Connection] = []

    def accept(self, num_peers: int, timeout_s: float) -> None:
        """Wait for `num_peers` ranks to connect; TimeoutError after `timeout_s`."""
        errors: list[BaseException] = []

        def accept_all() -> None:
            try:
                while len(self._peers) < num_peers:
                    self._peers.append(self._listener.accept())
            except BaseException as exc:  # closed listener or a failed handshake
                errors.append(exc)

        thread = threading.Thread(target=accept_all, name="plan-accept", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if len(self._peers) < num_peers:
            self._listener.close()  # ends the accept thread
            detail = f": {errors[0]}" if errors else ""
            raise TimeoutError(f"{len(self._peers)} of {num_peers} ranks connected within "
                               f"{timeout_s:g} s{detail}")

    def send(self, plan: StepPlan) -> int:
        """Write one plan to every peer; returns its size in bytes."""
        payload = pickle.dumps(plan, protocol=pickle.HIGHEST_PROTOCOL)
        for peer in self._peers:
            peer.send_bytes(payload)  # BrokenPipeError / ConnectionError if that rank died
        return len(payload)

    def close(self) -> None:
        """Tell every rank to exit (best effort) and close the sockets."""
        for peer in self._peers:
            try:
                peer.send_bytes(_STOP)
            except OSError:
                pass
            peer.close()
        self._peers.clear()
        self._listener.close()


class PlanReceiver:
    """Another rank's end: one connection to rank 0."""

    def __init__(self, address: tuple[str, int], authkey: bytes, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:  # rank 0 may not listen yet only if it was slow to start; retry briefly
            try:
                self._conn = Client(address, authkey=authkey)
                return
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def recv(self) -> StepPlan | None:
        """The next plan; None when rank 0 says stop. EOFError when rank 0 is gone."""
        payload = self._conn.recv_bytes()
        return None if payload == _STOP else pickle.loads(payload)

    def close(self) -> None:
        self._conn.close()
